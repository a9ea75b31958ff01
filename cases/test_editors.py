"""S3 with the real programs: emacs, brz, vim, git, sed -i and rsync (LP#1879196).

The report was found with real clients: a file edited on the host with emacs,
or rewritten by `bzr revert`, kept its old content inside an LXD container that
read it through the shifted mount, while vim and shell redirection did not show
it.  Each client saves in its own way (backup by rename or by copy, a temporary
file renamed over, an in-place rewrite, git's remove and create), so each
client x style is a case: the host runs the program on the underlay under the
container's warm reader (fixtures/rename_over.py), which must see the new
content, size and mtime at once, the backup where the program made one, and
no ESTALE.  The reverse cases run the program inside the container, through
the stack, and the host must find the content with the ids mapped; then the
host saves F by backup-by-rename (F to F~, a new F) and the container saves
again: its save must land in the new F, and F~ keep the host's backup.

Which client x style catches the stale-dentry bug (the bundled FUSE stack's
switch, reproducing the shiftfs bug of the report) is the point of the matrix,
measured on fuse-shift over tmpfs:

  red (F gets a new inode)         green (F rewritten in place)
  050 emacs, backup by rename      051 emacs, backup-by-copying
  053 emacs --batch                052 emacs, no backups
  054 brz revert                   057 vim, backupcopy=yes
  055 brz revert --no-backup       063 rsync --inplace
  056 vim, backupcopy=auto
  058 vim, backupcopy=no
  059 git checkout, 060 git stash
  061 sed -i, 062 rsync

The report saw no bug with vim: vim rewrites in place whenever it makes no
backup (its default 'backupskip' covers /tmp, for one), and with a backup its
default renames, as emacs does.  The bug also breaks the reverse direction when
the container's names are cached stale: 070 (emacs' lock file), 071 (brz init)
and 073 (git init) fail with it.  The renamed-lower switch (shiftfs as its fix
left it) turns only the saves that rename F to a backup red (050, 053, 054)
and every container-side save after the host's backup-by-rename save (070-075:
the save lands in F~, or moves or removes it, as F still names the file the
host renamed).  tests/test_bug_switches.py holds this matrix to account.
"""

import os
import shutil

from fixtures import Bug, Needs, case, check, log, step
from fixtures.rename_over import judge, read_md5, rename_over_repro, replace_under_stack
from harness import clients

LP1879196 = Bug("shiftfs: a file edited on the host with emacs or bzr revert keeps its old content in the container",
                lp=1879196, link="https://bugs.launchpad.net/bugs/1879196")
OLD = b"version A, as the host wrote it\n"
HOST_SAVE = b"version C, saved on the host by backup-by-rename\n"
FAST = ("auto", "editors", "rename")   # well under a second a save
SLOW = ("editors", "rename")           # terminal sessions and brz's start-up

# case id: (client, style, groups); the ids stay fixed when clients are added
HOST_EDITS = {
    "stack/050": ("emacs", "backup-rename", SLOW),
    "stack/051": ("emacs", "backup-copy", SLOW),
    "stack/052": ("emacs", "no-backup", SLOW),
    "stack/053": ("emacs", "batch", FAST),
    "stack/054": ("brz", "revert", SLOW),
    "stack/055": ("brz", "revert-no-backup", SLOW),
    "stack/056": ("vim", "auto", SLOW),
    "stack/057": ("vim", "yes", SLOW),
    "stack/058": ("vim", "no", SLOW),
    "stack/059": ("git", "checkout", FAST),
    "stack/060": ("git", "stash", FAST),
    "stack/061": ("sed", "in-place", FAST),
    "stack/062": ("rsync", "default", FAST),
    "stack/063": ("rsync", "inplace", FAST),
}
CONTAINER_EDITS = {
    "stack/070": ("emacs", "backup-rename", SLOW),
    "stack/071": ("brz", "revert", SLOW),
    "stack/072": ("vim", "auto", SLOW),
    "stack/073": ("git", "checkout", FAST),
    "stack/074": ("sed", "in-place", FAST),
    "stack/075": ("rsync", "default", FAST),
}


def new_content(name, style):
    return f"version B, saved by {name} ({style})\n".encode()


def session_for(stack, owner=0):
    """A fresh HOME for the client, beside the stack (not on the underlay), owned by
    whoever runs the client."""
    home = os.path.join(stack.workdir, "client-home")
    shutil.rmtree(home, ignore_errors=True)
    os.makedirs(home, mode=0o755)
    os.chown(home, owner, owner)
    return clients.Session(home)


def templates(stack):
    """Where the host's repositories are made once for the run (Client.prepare): beside the
    stack, kept from case to case.  The container makes its own every time: its brz and git
    init run through the stack, and are part of what the case tests."""
    return os.path.join(stack.workdir, "client-templates")


def host_edit_case(stack, name, style):
    client = clients.client(name)
    session = session_for(stack)
    log(f"client: {client.version(session)}; {style}: {client.styles[style]}")
    new = new_content(name, style)
    replace_under_stack(stack, lambda path: client.save_and_check(path, new, style, session),
                        f"{name} ({style})", OLD, new=new,
                        prepare=lambda path, old: client.prepare(path, old, new, session, templates(stack)))


def _edit_in_container(root, name, style, home, prepare=True):
    client = clients.client(name)
    session = clients.Session(home)
    path = os.path.join(root, "F")
    new = new_content(name, style)
    with step(f"S4 container: {name} ({style}) edits F through the stack" if prepare
              else f"S3 container: {name} ({style}) saves d/F through the stack"):
        if prepare:
            client.prepare(path, OLD, new, session)
        return client.save_and_check(path, new, style, session)


def _prepare_and_read_in_container(root, name, style, home):
    os.makedirs(root)
    path = os.path.join(root, "F")
    with step(f"S3 container: {name} ({style}) prepares d/F, then d/F is read through the stack"):
        clients.client(name).prepare(path, OLD, new_content(name, style), clients.Session(home))
        read_md5(path)


def container_edit_case(stack, name, style):
    client = clients.client(name)
    session = session_for(stack, owner=stack.host_ids(0))
    log(f"client: {client.version(session)}; {style}: {client.styles[style]}")
    backup = stack.run(_edit_in_container, stack.path(), name, style, session.home)
    # A shifting stack maps container root to on-disk 0; otherwise its host id is what lands.
    owner = 0 if "shift" in stack.variant_traits(stack.variant) else stack.host_ids(0)
    for rel, content in (("F", new_content(name, style)), (backup, OLD)):
        if rel is None:
            continue
        path = stack.on_underlay(rel)
        with step(f"S4 host: read {rel} on the underlay"):
            with open(path, "rb") as f:
                data = f.read()
            st = os.stat(path)
        check(data == content, f"S4 host: {rel} holds what {name} saved in the container", f"{data[:60]!r}")
        check((st.st_uid, st.st_gid) == (owner, owner), f"S4 host: {rel} is owned by container root, mapped",
              f"uid/gid {st.st_uid}/{st.st_gid}, expected {owner}/{owner}")
    save_after_host_backup(stack, name, style, session)


def save_after_host_backup(stack, name, style, session):
    """LP#1879196 after its fix: the container's save of F must land in F, not in F~, after
    the host saved F by backup-by-rename (on shiftfs F still reached the file renamed to F~,
    so the container overwrote the host's backup and lost its save).  In d/: the container
    prepares F and reads it, the host renames F to F~ and writes a new F on the underlay,
    the container saves F again with the client.  F~ keeps the host's backup unless the
    client's save made F~ itself (emacs): then it holds the host's save, which the client
    saved over."""
    if stack.underlay_changes_undefined:
        log(f"S3 the host's save under the container's client: not run: {stack.underlay_changes_undefined}")
        return
    stack.run(_prepare_and_read_in_container, stack.path("d"), name, style, session.home)
    path = stack.on_underlay("d", "F")
    with step("S3 host: rename d/F to d/F~ and write a new d/F on the underlay (emacs' default save)"):
        os.rename(path, path + "~")
        with open(path, "wb") as f:
            f.write(HOST_SAVE)
    failed = backup = None
    try:
        backup = stack.run(_edit_in_container, stack.path("d"), name, style, session.home, False)
    except clients.ClientFailed as e:  # raised below unless what landed where shows more
        log(f"S3 container: {e}")
        failed = e
    seen = {}
    for rel in ("F", "F~"):
        with step(f"S3 host: read d/{rel} on the underlay"):
            seen[f"d/{rel}"] = True, _content(stack.on_underlay("d", rel))
    judge(stack, seen, {"d/F": new_content(name, style), "d/F~": HOST_SAVE if backup == "F~" else OLD},
          f"{name} ({style}) saved F in the container after the host's backup-by-rename save",
          where="on the underlay")
    if failed:
        raise failed


def _content(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return "absent"


def host_edit_repro(name, style):
    """S3 with this client outside stackcheck: its prepare and save steps, run with
    the same clean environment (for a terminal style, the same save without one)."""
    client = clients.client(name)
    new = new_content(name, style)

    def plain(steps):
        return [("write", s.path, s.data) if isinstance(s, clients.Write) else ("run", list(s.argv)) for s in steps]
    prepare_code = f"""
# {name} ({style}): {client.styles[style]}
HOME_DIR = os.path.join(SCRATCH, "home")
os.makedirs(HOME_DIR, exist_ok=True)
ENV = {{k: v.replace("{{home}}", HOME_DIR) for k, v in {clients.Session("{home}").env(client.env)!r}.items()}}
PREPARE = {plain(client.prepare_steps("F", OLD, new))!r}
SAVE = {plain(client.save_steps("F", new, style))!r}


def run_steps(directory, steps):
    for kind, what, *data in steps:
        if kind == "write":
            with open(os.path.join(directory, what.replace("{{home}}", HOME_DIR)), "wb") as f:
                f.write(data[0])
        else:
            subprocess.run([w.replace("{{home}}", HOME_DIR) for w in what], cwd=directory, env=ENV, check=True,
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)


def prepare(path):
    run_steps(os.path.dirname(path), PREPARE)
"""
    save_code = "def save(path):\n    run_steps(os.path.dirname(path), SAVE)\n"
    return rename_over_repro(OLD, new, style not in client.in_place, save_code, prepare_code)


def _declare(case_id, name, style, groups, body, title):
    cls = clients.clients()[name]

    def test(stack):
        body(stack, name, style)
    test.__name__ = f"test_{body.__name__}_{name}_{style}".replace("-", "_")
    test.__doc__ = cls.styles[style]
    repro = host_edit_repro(name, style) if body is host_edit_case else None
    globals()[test.__name__] = case(case_id, title, groups, bug=LP1879196,
                                    needs=Needs(commands=(cls.command,)), repro=repro)(test)


for _id, (_name, _style, _groups) in HOST_EDITS.items():
    _declare(_id, _name, _style, _groups, host_edit_case,
             f"Host saves with {_name} ({_style}) under a container's warm reader; the stack shows the new "
             "content at once")
for _id, (_name, _style, _groups) in CONTAINER_EDITS.items():
    _declare(_id, _name, _style, _groups, container_edit_case,
             f"The container saves with {_name} ({_style}) through the stack; the host sees it, ids mapped, "
             "and after its own backup-by-rename save the container's save lands in the new F")
