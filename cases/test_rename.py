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
