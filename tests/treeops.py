"""Operation sequences applied to two filesystems, and their trees compared.

An operation is a tuple ("chmod", "a/f", 0o600); applying one gives "ok" or
the errno's name, so errnos are compared too.  A tree is every object below
a directory: name -> (type, mode, size, content or target, uid, gid, xattrs).
"""

import errno
import os
import random
import stat

NAMES = ["f", "g", "d", "d/f", "d/g", "d/e", "d/e/f", "e", "l"]
XATTRS_COMPARED = ("user.",)


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


ACTIONS = {
    "create": _create,
    "write": _write,
    "truncate": os.truncate,
    "mkdir": lambda p: os.mkdir(p, 0o755),
    "rmdir": os.rmdir,
    "unlink": os.unlink,
    "rename": os.rename,
    "link": os.link,
    "symlink": lambda target, p: os.symlink(target, p),
    "chmod": os.chmod,
    "chown": lambda p, u, g: os.chown(p, u, g, follow_symlinks=False),
    "setxattr": lambda p, n, v: os.setxattr(p, n, v, follow_symlinks=False),
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


def layer_tree(root):
    """An overlayfs layer as it is on disk: whiteouts and opaque markers included."""
    snapshot = {}
    for directory, dirs, files in os.walk(root):
        for name in sorted(dirs + files):
            path = os.path.join(directory, name)
            st = os.lstat(path)
            kind = stat.S_IFMT(st.st_mode)
            whiteout = stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
            opaque = False
            if stat.S_ISDIR(st.st_mode):
                try:
                    opaque = os.getxattr(path, "trusted.overlay.opaque") == b"y"
                except OSError:
                    pass
            snapshot[os.path.relpath(path, root)] = ("whiteout" if whiteout else kind, opaque)
    return snapshot


def random_ops(seed, count, owners=(0, 1000)):
    rng = random.Random(seed)
    ops = []
    for _ in range(count):
        kind = rng.choice(list(ACTIONS))
        a, b = rng.choice(NAMES), rng.choice(NAMES)
        if kind in ("create", "write"):
            ops.append((kind, a, f"{kind} {rng.randrange(1000)}\n".encode()))
        elif kind == "truncate":
            ops.append((kind, a, rng.randrange(8)))
        elif kind in ("rename", "link"):
            ops.append((kind, a, b))
        elif kind == "symlink":
            ops.append((kind, "target-" + a, b))
        elif kind == "chmod":
            ops.append((kind, a, rng.choice([0o600, 0o644, 0o755, 0o700])))
        elif kind == "chown":
            ops.append((kind, a, rng.choice(owners), rng.choice(owners)))
        elif kind == "setxattr":
            ops.append((kind, a, "user.stackcheck", f"v{rng.randrange(100)}".encode()))
        else:
            ops.append((kind, a))
    return ops


def make_lower(root):
    """A lower layer with files, nested directories, a symlink and an xattr."""
    os.makedirs(os.path.join(root, "d", "e"))
    for rel, data in (("f", b"lower f\n"), ("d/f", b"lower d/f\n"), ("d/e/f", b"lower d/e/f\n")):
        with open(os.path.join(root, rel), "wb") as f:
            f.write(data)
    os.symlink("f", os.path.join(root, "l"))
    os.setxattr(os.path.join(root, "d", "f"), "user.origin", b"lower")
    os.chown(os.path.join(root, "d", "e", "f"), 1000, 1000)
