"""S3: the underlay changes under the stack: rename-over edits (LP#1879196).

A file edited on the host with emacs, or rewritten by `bzr revert`, kept its
old content inside an LXD container that read it through the shifted mount.
Here the host replaces the file by each save strategy (S3 a-d) under a warm
reader (fixtures/rename_over.py says what it must see); the editors group
does the same with the real programs.
"""

import errno
import inspect
import os
import shutil

from fixtures import Bug, Repro, case, check, errname, layers_laid_out, step
from fixtures.rename_over import attempt, judge, md5, read_md5 as _read, rename_over_repro, replace_under_stack, \
    size_and_mtime as _stat

LP1879196 = Bug("shiftfs: a file replaced on the host by rename keeps its old content in the container",
                lp=1879196, link="https://bugs.launchpad.net/bugs/1879196")
GROUPS = ("auto", "quick", "rename")
CONTENT_A = b"version A of the file\n" * 100
CONTENT_B = b"version B of the file, a little longer\n" * 150


# -- host-side save strategies (scenario S3 a-d), on the underlay; each returns its backup's name
def save_tmp_rename(path):
    """write F.tmp, fsync, rename over F (brz revert, git checkout, most savers)"""
    with open(path + ".tmp", "wb") as f:
        f.write(CONTENT_B)
        f.flush()
        os.fsync(f.fileno())
    os.rename(path + ".tmp", path)


def save_backup_rename(path):
    """rename F to F~, write a new F (emacs' default: backup by renaming)"""
    os.rename(path, path + "~")
    with open(path, "wb") as f:
        f.write(CONTENT_B)
    return "F~"


def save_copy_in_place(path):
    """copy F to F~, truncate and rewrite F in place (emacs' backup-by-copying)"""
    shutil.copy2(path, path + "~")
    with open(path, "r+b") as f:
        f.truncate(0)
        f.write(CONTENT_B)
    return "F~"


def save_unlink_create(path):
    """unlink F, create F (remove, then redirect)"""
    os.unlink(path)
    with open(path, "wb") as f:
        f.write(CONTENT_B)


def s3_repro(save, new_inode):
    """S3 outside stackcheck, with the host's save as its very code."""
    return rename_over_repro(CONTENT_A, CONTENT_B, new_inode,
                             f"CONTENT_B = NEW\n\n\n{inspect.getsource(save).strip()}\n\n\nsave = {save.__name__}\n")


def rename_over_case(stack, save):
    replace_under_stack(stack, save, save.__doc__.split(" (")[0], CONTENT_A)


@case("stack/010", "Host replaces a file by write-temp + fsync + rename (brz revert, git); the stack sees it",
      GROUPS, bug=LP1879196, repro=s3_repro(save_tmp_rename, new_inode=True))
def test_tmp_rename_over(stack):
    rename_over_case(stack, save_tmp_rename)


@case("stack/011", "Host renames F to F~ and writes a new F (emacs' default save); the stack sees both",
      GROUPS, bug=LP1879196, repro=s3_repro(save_backup_rename, new_inode=True))
def test_backup_by_rename(stack):
    rename_over_case(stack, save_backup_rename)


@case("stack/012", "Host copies F to F~ and rewrites F in place (backup-by-copying, the control)",
      GROUPS, bug=LP1879196, repro=s3_repro(save_copy_in_place, new_inode=False))
def test_copy_and_rewrite_in_place(stack):
    rename_over_case(stack, save_copy_in_place)


@case("stack/013", "Host unlinks F and creates it again; the stack sees the new file",
      GROUPS, bug=LP1879196, repro=s3_repro(save_unlink_create, new_inode=True))
def test_unlink_and_create(stack):
    rename_over_case(stack, save_unlink_create)


# -- negative entries and directory renames -----------------------------------------------
def _negative_reader(channel, root):
    with step("S3 warm: stat H through the stack (exists)"):
        os.stat(os.path.join(root, "H"))
    ok, err = attempt("S3 warm: stat G through the stack", lambda: os.stat(os.path.join(root, "G")))
    check(not ok and err == errno.ENOENT, "S3 warm: G does not exist yet (ENOENT)",
          "it exists" if ok else f"got {errname(err)}")
    channel.send("warm")
    channel.recv()
    return {"stat G (created on the underlay)": attempt("S3 stat G", lambda: _stat(os.path.join(root, "G"))),
            "read G": attempt("S3 read G", lambda: _read(os.path.join(root, "G"))),
            "stat H (removed on the underlay)": attempt("S3 stat H", lambda: _stat(os.path.join(root, "H")))}


def _judge_presence(stack, seen, expected, what):
    """Like judge(), but ENOENT is the expected answer for names that went away."""
    for label, want in expected.items():
        if want == errno.ENOENT:
            ok, value = seen[label]
            if ok or value == errno.ENOENT:  # other errors stay errors, for judge() to fail
                seen[label] = (True, "exists" if ok else "ENOENT")
            expected[label] = "ENOENT"
    judge(stack, seen, expected, what)


@case("stack/014", "Names created and removed on the underlay show through the stack at once (negative dentries)",
      GROUPS, bug=LP1879196, repro=Repro(
          "a name the host creates on the underlay is found through the stack at once, and a name it removes "
          "is gone at once (ENOENT), even after the stack was asked for both", """
with open(os.path.join(HOST, "H"), "wb") as f:
    f.write(b"H, made by the host")


def reader():
    os.stat(os.path.join(MNT, "H"))
    yield attempt(lambda: os.stat(os.path.join(MNT, "G")) and "exists")  # G does not exist yet
    yield {name: attempt(lambda: os.stat(os.path.join(MNT, name)) and "exists") for name in ("G", "H")}


user = in_container(reader)
show("stat G before the host makes it", user.next(), "ENOENT")
with open(os.path.join(HOST, "G"), "wb") as f:  # the host, on the underlay
    f.write(b"G, made by the host")
os.unlink(os.path.join(HOST, "H"))
seen = user.next()
show("stat G (created on the underlay)", seen["G"], "exists")
show("stat H (removed on the underlay)", seen["H"], "ENOENT")
user.close()
"""))
def test_negative_entries(stack):
    with open(stack.host_path("H"), "wb") as f:
        f.write(CONTENT_A)
    layers_laid_out(stack)
    reader = stack.start(_negative_reader, stack.path())
    try:
        check(reader.recv() == "warm", "S3 the reader warmed its caches")
        with step("S3 host: create G and remove H on the underlay"):
            with open(stack.host_path("G"), "wb") as f:
                f.write(CONTENT_B)
            os.unlink(stack.host_path("H"))
            st = os.stat(stack.host_path("G"))
        reader.send("changed")
        seen = reader.result()
    finally:
        reader.close()
    expected = {"stat G (created on the underlay)": (st.st_size, st.st_mtime_ns), "read G": md5(CONTENT_B),
                "stat H (removed on the underlay)": errno.ENOENT}
    _judge_presence(stack, seen, expected, "negative entries")


def _dir_rename_reader(channel, root):
    with step("S3 warm: stat D and read D/F through the stack"):
        os.stat(os.path.join(root, "D"))
        _read(os.path.join(root, "D", "F"))
    channel.send("warm")
    channel.recv()
    return {"read E/F (the renamed directory)": attempt("S3 read E/F", lambda: _read(os.path.join(root, "E", "F"))),
            "stat D (the old name)": attempt("S3 stat D", lambda: _stat(os.path.join(root, "D")))}


@case("stack/015", "A directory renamed on the underlay is found under its new name through the stack",
      GROUPS, bug=LP1879196, repro=Repro(
          "a directory the host renames on the underlay is found under its new name through the stack at "
          "once, and its old name is gone (ENOENT)", """
os.makedirs(os.path.join(HOST, "D"))
with open(os.path.join(HOST, "D", "F"), "wb") as f:
    f.write(b"F in D")


def reader():
    os.stat(os.path.join(MNT, "D"))
    md5(os.path.join(MNT, "D", "F"))
    yield "warm"
    yield {"read E/F": attempt(lambda: md5(os.path.join(MNT, "E", "F"))),
           "stat D": attempt(lambda: os.stat(os.path.join(MNT, "D")) and "exists")}


user = in_container(reader)
user.next()
os.rename(os.path.join(HOST, "D"), os.path.join(HOST, "E"))  # the host, on the underlay
seen = user.next()
show("read E/F (the renamed directory)", seen["read E/F"], hashlib.md5(b"F in D").hexdigest())
show("stat D (the old name)", seen["stat D"], "ENOENT")
user.close()
"""))
def test_directory_renamed_on_underlay(stack):
    os.makedirs(stack.host_path("D"))
    with open(stack.host_path("D", "F"), "wb") as f:
        f.write(CONTENT_A)
    layers_laid_out(stack)
    reader = stack.start(_dir_rename_reader, stack.path())
    try:
        check(reader.recv() == "warm", "S3 the reader warmed its caches")
        with step("S3 host: rename D to E on the underlay"):
            os.rename(stack.host_path("D"), stack.host_path("E"))
        reader.send("renamed")
        seen = reader.result()
    finally:
        reader.close()
    _judge_presence(stack, seen, {"read E/F (the renamed directory)": md5(CONTENT_A),
                                  "stat D (the old name)": errno.ENOENT}, "directory rename")



# -- F renamed away by the host's save still reaches F~: LP#1879196 after its fix ----------------
CONTENT_C = b"version C, written through the stack\n" * 50
AFTER_BACKUP_RENAME = "after the host renamed F to F~ and wrote a new F (emacs' default save) on the underlay, "


def warm_by_reading(path):
    """read F whole and stat it"""
    _read(path)
    os.stat(path)


def warm_by_stat(path):
    """stat F, no open"""
    os.stat(path)


def overwrite(path):
    """open F O_WRONLY|O_TRUNC and write"""
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, CONTENT_C)
    finally:
        os.close(fd)


def size_mtime_inode(path):
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns, st.st_ino


def _look(path):
    return {"md5 of F": attempt(f"S3 read {path}", lambda: _read(path)),
            "size, mtime, inode number of F": attempt(f"S3 stat {path}", lambda: size_mtime_inode(path)),
            "md5 of F~": attempt(f"S3 read {path}~", lambda: _read(path + "~"))}


def _write(path):
    return {overwrite.__doc__: attempt(f"S3 {overwrite.__doc__} ({path})", lambda: overwrite(path))}


def _warm_save_then(channel, directory, path, warm, then):
    """The container, its cwd in F's directory: warm F, let the host save, then look or write."""
    os.chdir(directory)
    with step(f"S3 warm: {warm.__doc__} ({path}) through the stack"):
        warm(path)
    channel.send("warm")
    channel.recv()
    return then(path)


def save_under_warm_reader(stack, path, warm, then):
    """d/F holds CONTENT_A; the container warms it by warm(path), the host saves it by
    backup-by-rename, the container does then(path).  What it saw, and the new F's stat."""
    os.makedirs(stack.host_path("d"))
    with open(stack.host_path("d", "F"), "wb") as f:
        f.write(CONTENT_A)
    layers_laid_out(stack)
    reader = stack.start(_warm_save_then, stack.path("d"), path, warm, then)
    try:
        check(reader.recv() == "warm", "S3 the reader warmed its caches")
        with step("S3 host: rename F to F~ and write a new F on the underlay (emacs' default save)"):
            save_backup_rename(stack.host_path("d", "F"))
            st = os.stat(stack.host_path("d", "F"))
        reader.send("saved")
        return reader.result(), st
    finally:
        reader.close()


def new_f_and_backup(st):
    """What F and F~ must show after the save, st: the new F's stat on the underlay."""
    return {"md5 of F": md5(CONTENT_B), "md5 of F~": md5(CONTENT_A),
            "size, mtime, inode number of F": (st.st_size, st.st_mtime_ns, st.st_ino)}


_REPRO_LOOK = """\
    yield {"md5 of F": attempt(lambda: md5(path)), "md5 of F~": attempt(lambda: md5(path + "~")),
           "size, mtime, inode number of F": attempt(lambda: size_mtime_inode(path))}


user = in_container(reader, PATH)
user.next()
save_backup_rename(os.path.join(HOST, "d", "F"))  # the host, on the underlay
seen = user.next()
st = os.stat(os.path.join(HOST, "d", "F"))
show("md5 of F", seen["md5 of F"], hashlib.md5(CONTENT_B).hexdigest())
show("size, mtime, inode number of F", seen["size, mtime, inode number of F"],
     (st.st_size, st.st_mtime_ns, st.st_ino))
show("md5 of F~", seen["md5 of F~"], hashlib.md5(OLD).hexdigest())
user.close()
"""
_REPRO_WRITE = """\
    yield attempt(lambda: overwrite(path))


user = in_container(reader, PATH)
user.next()
save_backup_rename(os.path.join(HOST, "d", "F"))  # the host, on the underlay
show("open F O_WRONLY|O_TRUNC and write through the stack", user.next(), None)
show("md5 of F on the underlay (the container's write)", md5(os.path.join(HOST, "d", "F")),
     hashlib.md5(CONTENT_C).hexdigest())
show("md5 of F~ on the underlay (the host's backup)", md5(os.path.join(HOST, "d", "F~")),
     hashlib.md5(OLD).hexdigest())
user.close()
"""


def renamed_away_repro(rule, warm, path_code, then_code, helper):
    """016-018 outside stackcheck: the container, its cwd in d, warms F (PATH) by warm,
    the host saves d/F by backup-by-rename, then_code (using helper) writes or looks."""
    sources = "\n\n\n".join(inspect.getsource(fn).strip() for fn in (save_backup_rename, warm, helper))
    return Repro(AFTER_BACKUP_RENAME + rule, f"""
OLD, CONTENT_B, CONTENT_C = {CONTENT_A!r}, {CONTENT_B!r}, {CONTENT_C!r}
_read = md5


{sources}


os.makedirs(os.path.join(HOST, "d"))
with open(os.path.join(HOST, "d", "F"), "wb") as f:
    f.write(OLD)
PATH = {path_code}


def reader(path):
    os.chdir(os.path.join(MNT, "d"))
    {warm.__name__}(path)
    yield "warm"
{then_code}""")


@case("stack/016", "After the host's backup-by-rename save, a write through the stack to F lands in the "
      "new F; F~ keeps the old content", GROUPS, bug=LP1879196, repro=renamed_away_repro(
          "a write through the stack to F (O_WRONLY|O_TRUNC) lands in the new F, and F~ keeps the old content",
          warm_by_reading, "os.path.join(MNT, 'd', 'F')", _REPRO_WRITE, overwrite))
def test_write_after_backup_by_rename(stack):
    """On shiftfs, after the host saved F by renaming it to F~ and writing a new F, the
    container's write to F (O_TRUNC) landed in F~ and the new F stayed untouched: the
    container lost its write and overwrote the host's backup.  shiftfs_d_revalidate keeps
    F's dentry while its lower dentry is hashed and of the same sign, and rename() moved
    that lower dentry, still hashed and positive, to F~."""
    seen, _ = save_under_warm_reader(stack, stack.path("d", "F"), warm_by_reading, _write)
    with step("S3 host: read F and F~ on the underlay"):
        seen["md5 of F (the container's write)"] = True, _read(stack.on_underlay("d", "F"))
        seen["md5 of F~ (the host's backup)"] = True, _read(stack.on_underlay("d", "F~"))
    judge(stack, seen, {"md5 of F (the container's write)": md5(CONTENT_C),
                        "md5 of F~ (the host's backup)": md5(CONTENT_A)},
          "backup-by-rename, then the container writes F", where="on the underlay")


@case("stack/017", "A name warmed by stat() alone shows the new F after the host's backup-by-rename save",
      GROUPS, bug=LP1879196, repro=renamed_away_repro(
          "F through the stack has the new F's content, size, mtime and inode number, and F~ the old content, "
          "for a reader that had only stat'ed F", warm_by_stat, "os.path.join(MNT, 'd', 'F')", _REPRO_LOOK,
          size_mtime_inode))
def test_stat_warmed_name(stack):
    """On shiftfs a container that had only stat'ed F (no open) saw the old content, size,
    inode number and mtime after the host's backup-by-rename save, and on every later read:
    the stat's lookup alone makes the dentry, and shiftfs_d_revalidate keeps it while its
    lower dentry, moved to F~ by rename(), stays hashed and positive."""
    seen, st = save_under_warm_reader(stack, stack.path("d", "F"), warm_by_stat, _look)
    judge(stack, seen, new_f_and_backup(st), "backup-by-rename after a stat-only warm-up")


@case("stack/018", "A reader in F's directory, by the name F alone, sees the new F after the host's "
      "backup-by-rename save", GROUPS, bug=LP1879196, repro=renamed_away_repro(
          "F through the stack has the new F's content, size, mtime and inode number, and F~ the old content, "
          "for a reader whose cwd is F's directory and who names it F", warm_by_reading, "'F'", _REPRO_LOOK,
          size_mtime_inode))
def test_relative_name_in_cwd(stack):
    """On shiftfs a reader whose cwd was F's directory, naming it "F", read the old F after
    the host's backup-by-rename save: the walk starts at the cwd, not the root, but ends at
    the same dentry of F, which shiftfs_d_revalidate keeps while its lower dentry, moved to
    F~ by rename(), stays hashed and positive."""
    seen, st = save_under_warm_reader(stack, "F", warm_by_reading, _look)
    judge(stack, seen, new_f_and_backup(st), "backup-by-rename, F read by its name relative to the cwd")
