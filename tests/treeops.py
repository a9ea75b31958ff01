"""Operation sequences applied to two filesystems, and their trees compared.

An operation is a tuple ("chmod", "a/f", 0o600); applying one gives "ok" or
the errno's name, so errnos are compared too.  A tree is every object below
a directory: name -> (type, mode, size, content or target, uid, gid, xattrs).
Lower layers are data (BASE, MIDDLE, TOP, in overlayfs' on-disk format);
random_ops makes a sequence from a seed, and exercises() says which of the
states worth reaching an operation meets on overlayfs' layers.
"""

import errno
import os
import random
import stat

XATTRS_COMPARED = ("user.",)
XATTR_NAMES = ("user.stackcheck", "user.origin")
COMPONENTS = ("f", "g", "d", "e", "l", "m", "p", "x")  # the names objects get, at every depth
OPEN_MODES = {"wronly": os.O_WRONLY, "rdwr": os.O_RDWR, "rdonly": os.O_RDONLY}


def _write(path, data):
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _create(path, data):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _open_trunc(path, mode, data):
    """open(2) with O_TRUNC (Linux truncates even O_RDONLY), then a write if the mode allows."""
    fd = os.open(path, OPEN_MODES[mode] | os.O_TRUNC)
    try:
        if mode != "rdonly":
            os.write(fd, data)
    finally:
        os.close(fd)


NEW_TREE = {"p": "dir", "p/x": "file", "p/e": "dir"}  # what mktree makes below its directory


def _mktree(path, data):
    """A new nested tree: the directory path, and NEW_TREE below it (files hold data)."""
    os.mkdir(path, 0o755)
    for rel, kind in NEW_TREE.items():
        if kind == "dir":
            os.mkdir(os.path.join(path, rel), 0o755)
        else:
            _create(os.path.join(path, rel), data)


def _rmtree(path):
    """rm -r, children first in name order (so both sides remove in the same order)."""
    if stat.S_ISDIR(os.lstat(path).st_mode):
        for name in sorted(os.listdir(path)):
            _rmtree(os.path.join(path, name))
        os.rmdir(path)
    else:
        os.unlink(path)


ACTIONS = {
    "create": _create,
    "write": _write,
    "open_trunc": _open_trunc,
    "truncate": os.truncate,
    "mkdir": lambda p: os.mkdir(p, 0o755),
    "mktree": _mktree,
    "rmdir": os.rmdir,
    "rmtree": _rmtree,
    "unlink": os.unlink,
    "rename": os.rename,
    "link": os.link,
    "symlink": lambda target, p: os.symlink(target, p),
    "chmod": os.chmod,
    "chown": lambda p, u, g: os.chown(p, u, g, follow_symlinks=False),
    "setxattr": lambda p, n, v: os.setxattr(p, n, v, follow_symlinks=False),
    "removexattr": lambda p, n: os.removexattr(p, n, follow_symlinks=False),
}
PATH_ARGS = {"rename": 2, "link": 2, "symlink": 1}  # which arguments are paths (default: the first)


def apply(root, ops):
    """Apply ops below root; the outcome of each: "ok" or an errno name."""
    outcomes = []
    for op in ops:
        name, args = op[0], list(op[1:])
        if name == "symlink":
            args[1] = os.path.join(root, args[1])
        else:
            for i in range(PATH_ARGS.get(name, 1)):
                args[i] = os.path.join(root, args[i])
        try:
            ACTIONS[name](*args)
            outcomes.append("ok")
        except OSError as e:
            outcomes.append(errno.errorcode.get(e.errno, str(e.errno)))
    return outcomes


def tree(root, compare_owners=True):
    snapshot = {}
    for directory, dirs, files in os.walk(root):
        for name in sorted(dirs + files):
            path = os.path.join(directory, name)
            st = os.lstat(path)
            rel = os.path.relpath(path, root)
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    content = f.read()
                size = st.st_size
            elif stat.S_ISLNK(st.st_mode):
                content, size = os.readlink(path), None
            else:
                content, size = None, None  # a directory's size is the filesystem's business
            xattrs = {}
            if not stat.S_ISLNK(st.st_mode):
                for x in sorted(os.listxattr(path)):
                    if x.startswith(XATTRS_COMPARED):
                        xattrs[x] = os.getxattr(path, x)
            owners = (st.st_uid, st.st_gid) if compare_owners else None
            snapshot[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), size, content, owners, xattrs)
    return snapshot


OPAQUE_XATTR = "trusted.overlay.opaque"


def _is_whiteout(path):
    try:
        st = os.lstat(path)
    except OSError:  # absent, or below a non-directory
        return False
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _is_opaque(path):
    try:
        return os.getxattr(path, OPAQUE_XATTR, follow_symlinks=False) == b"y"
    except OSError:
        return False


def layer_tree(root):
    """An overlayfs layer as it is on disk: whiteouts and opaque markers included."""
    snapshot = {}
    for directory, dirs, files in os.walk(root):
        for name in sorted(dirs + files):
            path = os.path.join(directory, name)
            kind = "whiteout" if _is_whiteout(path) else stat.S_IFMT(os.lstat(path).st_mode)
            snapshot[os.path.relpath(path, root)] = (kind, _is_opaque(path))
    return snapshot


# -- lower layers ------------------------------------------------------------------------
DIR, OPAQUE, WHITEOUT = "dir", "opaque dir", "whiteout"  # besides bytes (a file) and Symlink


class Symlink(str):
    """A symlink's target, in a layer's description."""


BASE = {  # the bottom lower layer: files, nested directories, a symlink
    "f": b"lower f\n", "d": DIR, "d/f": b"lower d/f\n", "d/e": DIR, "d/e/f": b"lower d/e/f\n",
    "l": Symlink("f"),
}
MIDDLE = {  # above BASE: d merges three layers; d/e hides BASE's d/e/f; l is whited out
    "d/g": b"middle d/g\n", "d/e": OPAQUE, "d/e/g": b"middle d/e/g\n", "l": WHITEOUT,
    "m/p/x": b"middle m/p/x\n", "g": b"middle g\n",
}
TOP = {  # above MIDDLE: d/e merges with MIDDLE's opaque d/e; g turns into a directory; m/p goes
    "d/e/f": b"top d/e/f\n", "g/p": b"top g/p\n", "m/p": WHITEOUT, "m/f": b"top m/f\n",
}
LOWER_LAYERS = (TOP, MIDDLE, BASE)  # top first, as overlayfs' lowerdir=top:middle:base


def make_layer(root, layer):
    for rel, what in sorted(layer.items()):  # parents sort before their children
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if what in (DIR, OPAQUE):
            os.makedirs(path, exist_ok=True)
            if what == OPAQUE:
                os.setxattr(path, OPAQUE_XATTR, b"y")
        elif what == WHITEOUT:
            os.mknod(path, stat.S_IFCHR | 0o000, os.makedev(0, 0))
        elif isinstance(what, Symlink):
            os.symlink(what, path)
        else:
            with open(path, "wb") as f:
                f.write(what)


LOWER_XATTRS = {("d/f", "user.origin"): b"lower", ("d/e", "user.origin"): b"lower dir"}


def make_lower(root):
    """The bottom lower layer (the only one, with one): BASE, xattrs and an owner."""
    make_layer(root, BASE)
    for (rel, name), value in LOWER_XATTRS.items():
        os.setxattr(os.path.join(root, rel), name, value)
    os.chown(os.path.join(root, "d", "e", "f"), 1000, 1000)


def lower_makers(count):
    """Functions that make count lower layers, top first; the bottom one is make_lower."""
    def maker(layer):
        return lambda root: make_layer(root, layer)
    return [maker(layer) for layer in LOWER_LAYERS[-count:-1]] + [make_lower]


def merged_names(count):
    """{name: "dir" or "file"} that count lower layers show merged."""
    names = {}
    for layer in reversed(LOWER_LAYERS[-count:]):
        for rel, what in sorted(layer.items()):
            parent = os.path.dirname(rel)
            while parent:  # directories a layer holds without naming them
                names[parent] = "dir"
                parent = os.path.dirname(parent)
            if not (what == DIR and names.get(rel) == "dir"):  # only a plain directory merges
                names = {n: k for n, k in names.items() if not n.startswith(rel + "/")}
            names.pop(rel, None)
            if what != WHITEOUT:
                names[rel] = "dir" if what in (DIR, OPAQUE) else "file"
    return names


# -- random sequences ------------------------------------------------------------------------
# Each kind once, renames thrice: they are where layers meet.
KINDS = tuple(ACTIONS) + ("rename", "rename")


def _moved(names, old, new):
    """names (a set of names, or of (name, anything)) with old and what is below it renamed new."""
    def rename(name):
        return new + name[len(old):] if name == old or name.startswith(old + "/") else name
    return {(rename(n[0]), *n[1:]) if isinstance(n, tuple) else rename(n) for n in names}


class _Guess:
    """What a sequence has probably made of the tree: names, which are directories,
    which directories it made (upper-only: they may move), which xattrs are set.
    Only a bias, so that operations mostly meet existing objects and new names land
    in existing directories (at depth) or where something was removed (over
    whiteouts); what is real is what the filesystems answer."""

    def __init__(self, rng, names):
        self.rng = rng
        self.kinds = dict(names)
        self.gone = set()
        self.new_dirs = set()
        self.xattrs = set(LOWER_XATTRS)

    def wild(self):
        """Any name, mostly absent: the errno paths."""
        return "/".join(self.rng.choice(COMPONENTS) for _ in range(self.rng.randint(1, 3)))

    def existing(self, kind=None):
        names = sorted(n for n, k in self.kinds.items() if kind in (None, k))
        return self.rng.choice(names) if names and self.rng.random() < 0.9 else self.wild()

    def fresh(self):
        if self.gone and self.rng.random() < 0.35:
            return self.rng.choice(sorted(self.gone))
        parents = [""] + sorted(n for n, k in self.kinds.items() if k == "dir" and n.count("/") < 3)
        return os.path.join(self.rng.choice(parents), self.rng.choice(COMPONENTS))

    def _below(self, rel):
        return [n for n in self.kinds if n == rel or n.startswith(rel + "/")]

    def _free(self, rel):
        """Whether a new object can be made at rel: nothing there, its parent a directory."""
        parent = os.path.dirname(rel)
        return rel not in self.kinds and (not parent or self.kinds.get(parent) == "dir")

    def made(self, rel, kind):
        if self._free(rel):
            self.kinds[rel] = kind
            self.gone.discard(rel)
            if kind == "dir":
                self.new_dirs.add(rel)

    def removed(self, rel):
        for name in self._below(rel):
            del self.kinds[name]
        self.new_dirs = {n for n in self.new_dirs if n in self.kinds}
        self.xattrs = {x for x in self.xattrs if x[0] in self.kinds}
        self.gone.add(rel)

    def moved(self, old, new):
        kind = self.kinds.get(old)
        if kind is None or new.startswith(old + "/") or self.kinds.get(new, kind) != kind \
                or (new not in self.kinds and not self._free(new)) \
                or any(n.startswith(new + "/") for n in self.kinds):
            return  # rename(2) fails
        moving = {new + n[len(old):]: self.kinds[n] for n in self._below(old)}
        new_dirs, xattrs = _moved(self.new_dirs, old, new), _moved(self.xattrs, old, new)
        self.removed(old)
        self.kinds.pop(new, None)
        self.gone.discard(new)
        self.kinds.update(moving)
        self.new_dirs, self.xattrs = new_dirs, xattrs

    def after(self, op):
        """Guess what op did."""
        kind, path = op[0], op[1]
        if kind in ("create", "link", "symlink"):
            self.made(op[2] if kind != "create" else path, "file")
        elif kind == "mkdir":
            self.made(path, "dir")
        elif kind == "mktree" and self._free(path):
            self.made(path, "dir")
            for rel, what in NEW_TREE.items():
                self.made(os.path.join(path, rel), what)
        elif kind in ("unlink", "rmtree") or (kind == "rmdir" and self._below(path) == [path]):
            self.removed(path)
        elif kind == "rename":
            self.moved(path, op[2])
        elif kind == "setxattr" and path in self.kinds:
            self.xattrs.add((path, op[2]))
        elif kind == "removexattr":
            self.xattrs.discard((path, op[2]))


def _random_op(kind, rng, guess, owners):
    data = f"{kind} {rng.randrange(1000)}\n".encode()
    if kind in ("create", "mktree"):
        return (kind, guess.fresh(), data)
    if kind == "mkdir":
        return (kind, guess.fresh())
    if kind == "symlink":
        return (kind, "target-" + rng.choice(COMPONENTS), guess.fresh())
    if kind == "link":
        return (kind, guess.existing("file"), guess.fresh())
    if kind == "rename":
        if guess.new_dirs and guess.gone and rng.random() < 0.3:  # over a whiteout, maybe a merged dir's
            return (kind, rng.choice(sorted(guess.new_dirs)), rng.choice(sorted(guess.gone)))
        return (kind, guess.existing(), rng.choice((guess.fresh, guess.existing))())
    if kind == "write":
        return (kind, guess.existing("file"), data)
    if kind == "open_trunc":
        return (kind, guess.existing("file"), rng.choice(sorted(OPEN_MODES)), data)
    if kind == "truncate":
        return (kind, guess.existing("file"), rng.randrange(8))
    if kind in ("unlink", "rmdir"):
        return (kind, guess.existing("file" if kind == "unlink" else "dir"))
    if kind == "chmod":
        return (kind, guess.existing(), rng.choice([0o600, 0o644, 0o755, 0o700]))
    if kind == "chown":
        return (kind, guess.existing(), rng.choice(owners), rng.choice(owners))
    if kind == "setxattr":
        return (kind, guess.existing(), rng.choice(XATTR_NAMES), f"v{rng.randrange(100)}".encode())
    if kind == "removexattr":
        if guess.xattrs and rng.random() < 0.7:
            return (kind, *rng.choice(sorted(guess.xattrs)))
        return (kind, guess.existing(), rng.choice(XATTR_NAMES))
    return (kind, guess.existing())  # rmtree


def random_ops(seed, count, owners=(0, 1000), lowers=1):
    """count operations from seed, on the tree that lowers lower layers show."""
    rng = random.Random(seed)
    guess = _Guess(rng, merged_names(lowers))
    ops = []
    for _ in range(count):
        ops.append(_random_op(rng.choice(KINDS), rng, guess, owners))
        guess.after(ops[-1])
    return ops


# -- what an operation exercises on overlayfs' layers ------------------------------------------------
STATES = {  # the states worth reaching, each met by an operation that succeeds
    "nested new tree", "nested new tree over a whiteout",
    "rename of a directory over a whiteout", "rename of a directory over a removed merged directory",
    "rmdir of a merged directory", "rmdir of an opaque directory",
    "rename inside an opaque directory", "rename across opaque directories",
    "removexattr", "removexattr of a lower object",
} | {f"O_TRUNC open ({mode}) of a lower file" for mode in OPEN_MODES}


def _opaque_ancestor(upper, rel):
    """The nearest directory above rel that is opaque in the upper layer, or None."""
    parent = os.path.dirname(rel)
    while parent:
        if _is_opaque(os.path.join(upper, parent)):
            return parent
        parent = os.path.dirname(parent)
    return None


def exercises(op, upper, lowers):
    """The STATES op meets if it succeeds, judged on overlayfs' layers (upper and
    lowers: directories) just before it runs."""
    kind, rel = op[0], op[1]
    found = set()
    in_upper, in_lowers = os.path.join(upper, rel), [os.path.join(lower, rel) for lower in lowers]
    if kind == "mktree":
        found.add("nested new tree over a whiteout" if _is_whiteout(in_upper) else "nested new tree")
    if kind == "removexattr":
        found.add("removexattr" if os.path.lexists(in_upper) else "removexattr of a lower object")
    if kind == "open_trunc" and not os.path.lexists(in_upper):
        found.add(f"O_TRUNC open ({op[2]}) of a lower file")
    if kind in ("rmdir", "rmtree") and os.path.isdir(in_upper):
        if _is_opaque(in_upper):
            found.add("rmdir of an opaque directory")
        elif any(map(os.path.isdir, in_lowers)):
            found.add("rmdir of a merged directory")
    if kind == "rename":
        new = op[2]
        if os.path.isdir(in_upper) and _is_whiteout(os.path.join(upper, new)):
            found.add("rename of a directory over a whiteout")
            if any(os.path.isdir(os.path.join(lower, new)) for lower in lowers):
                found.add("rename of a directory over a removed merged directory")
        inside = {_opaque_ancestor(upper, rel), _opaque_ancestor(upper, new)}
        if inside != {None}:
            found.add("rename inside an opaque directory" if len(inside) == 1
                      else "rename across opaque directories")
    assert found <= STATES, found - STATES
    return found
