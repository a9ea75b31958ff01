"""S3: the underlay changes under the stack: rename-over edits (LP#1879196).

A file edited on the host with emacs, or rewritten by `bzr revert`, kept its
old content inside an LXD container that read it through the shifted mount.
Here a reader process of the stack's user warms the caches (a whole read and
a stat; an fd kept open; its cwd in the file's directory), the host replaces
the file on the underlay by one save strategy, and the reader looks again at
once, with no sleep in between.

Correct for shifting stacks: the new content (md5 equal to the underlay's),
size and mtime agree, the backup file reads the old content, no ESTALE; an fd
opened before the change still reads the old inode, a new open the new one.
Kernel overlayfs leaves changes to its layers while mounted undefined: there
the case asserts only that every call succeeds or fails with ENOENT, and
reports the content comparison as an expected failure.
"""

import errno
import hashlib
import os
import shutil

from fixtures import Bug, StepFailed, case, check, errname, log, step, undefined_on_union

LP1879196 = Bug("shiftfs: a file replaced on the host by rename keeps its old content in the container",
                lp=1879196, link="https://bugs.launchpad.net/bugs/1879196")
GROUPS = ("auto", "quick", "rename")
CONTENT_A = b"version A of the file\n" * 100
CONTENT_B = b"version B of the file, a little longer\n" * 150
WARM_VARIANTS = ("read", "fd", "cwd")  # d-read/F, d-fd/F, d-cwd/F


def md5(data):
    return hashlib.md5(data).hexdigest()


# -- host-side save strategies (scenario S3 a-d), on the underlay -------------------
def save_tmp_rename(path, data):
    """a. write F.tmp, fsync, rename over F: bzr/brz revert, git checkout, most savers."""
    with open(path + ".tmp", "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.rename(path + ".tmp", path)


def save_backup_rename(path, data):
    """b. rename F to F~, write a new F: emacs' default (backup by renaming)."""
    os.rename(path, path + "~")
    with open(path, "wb") as f:
        f.write(data)


def save_copy_in_place(path, data):
    """c. copy F to F~, truncate and rewrite F in place: emacs' backup-by-copying."""
    shutil.copy2(path, path + "~")
    with open(path, "r+b") as f:
        f.truncate(0)
        f.write(data)


def save_unlink_create(path, data):
    """d. unlink F, create F: remove, then redirect."""
    os.unlink(path)
    with open(path, "wb") as f:
        f.write(data)


# -- the stack user's side -------------------------------------------------------------
def attempt(label, fn):
    """(True, value) or (False, errno): every call's outcome is an observation."""
    try:
        value = fn()
    except OSError as e:
        log(f"{label}: {errname(e.errno)}")
        return False, e.errno
    log(f"{label}: ok")
    return True, value


def _read(path):
    with open(path, "rb") as f:
        return md5(f.read())


def _stat(path):
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def _reader(channel, root, with_backup):
    """Warm every variant, wait for the host's edit, then look again."""
    held_fds = {}
    for variant in WARM_VARIANTS:
        path = os.path.join(root, f"d-{variant}", "F")
        with step(f"S3 warm ({variant}): read F whole and stat it through the stack"):
            before = _read(path)
            os.stat(path)
            if variant == "fd":
                held_fds[variant] = os.open(path, os.O_RDONLY)
            if variant == "cwd":
                os.chdir(os.path.dirname(path))
        check(before == md5(CONTENT_A), f"S3 warm ({variant}): F reads content A", f"md5 {before}")
    channel.send("warm")
    channel.recv()  # the host has replaced every F
    seen = {}
    for variant in WARM_VARIANTS:
        # the cwd variant looks the name up relative to its cwd, as a shell there would
        path = "F" if variant == "cwd" else os.path.join(root, f"d-{variant}", "F")
        seen[f"{variant}: read F"] = attempt(f"S3 ({variant}) read {path}", lambda p=path: _read(p))
        seen[f"{variant}: stat F"] = attempt(f"S3 ({variant}) stat {path}", lambda p=path: _stat(p))
        if with_backup:
            seen[f"{variant}: read F~"] = attempt(f"S3 ({variant}) read {path}~", lambda p=path: _read(p + "~"))
    fd = held_fds["fd"]
    seen["fd: read through the fd opened before"] = attempt(
        "S3 (fd) read the fd opened before the change", lambda: md5(os.pread(fd, 1 << 20, 0)))
    return seen


def judge(stack, seen, expected, what):
    """Fail on an error a correct stack never gives; compare content; overlayfs: xfail."""
    for label, (ok, value) in seen.items():
        if ok:
            continue
        if value == errno.ESTALE or not stack.underlay_changes_undefined or value != errno.ENOENT:
            raise StepFailed(f"S3 {what}, {label} through the stack: expected success, got {errname(value)}")
    mismatches = [f"{label}: expected {want}, got {seen[label][1] if seen[label][0] else errname(seen[label][1])}"
                  for label, want in expected.items() if seen[label] != (True, want)]
    for line in mismatches:
        log(f"mismatch: {line}")
    if mismatches and not stack.underlay_changes_undefined:
        raise StepFailed(f"S3 {what}, seen through the stack at once: " + "; ".join(mismatches))
    undefined_on_union(stack, f"S3 {what}: {len(mismatches)} of {len(expected)} observations differ "
                              "from the underlay (details in .full)")


def rename_over_case(stack, save, with_backup, old_fd_reads_new):
    for variant in WARM_VARIANTS:
        os.makedirs(stack.host_path(f"d-{variant}"))
        with open(stack.host_path(f"d-{variant}", "F"), "wb") as f:
            f.write(CONTENT_A)
    reader = stack.start(_reader, stack.path(), with_backup)
    try:
        check(reader.recv() == "warm", "S3 the reader warmed its caches")
        expected = {}
        for variant in WARM_VARIANTS:
            path = stack.host_path(f"d-{variant}", "F")
            with step(f"S3 host: {save.__doc__.split(':')[0]} on the underlay ({variant})"):
                save(path, CONTENT_B)
                st = os.stat(path)
                with open(path, "rb") as f:
                    expected[f"{variant}: read F"] = md5(f.read())
            expected[f"{variant}: stat F"] = (st.st_size, st.st_mtime_ns)
            if with_backup:
                expected[f"{variant}: read F~"] = md5(CONTENT_A)
        expected["fd: read through the fd opened before"] = md5(CONTENT_B if old_fd_reads_new else CONTENT_A)
        reader.send("edited")
        seen = reader.result()
    finally:
        reader.close()
    judge(stack, seen, expected, save.__doc__.split(":")[0])


@case("stack/010", "Host replaces a file by write-temp + fsync + rename (brz revert, git); the stack sees it",
      GROUPS, bug=LP1879196)
def test_tmp_rename_over(stack):
    rename_over_case(stack, save_tmp_rename, with_backup=False, old_fd_reads_new=False)


@case("stack/011", "Host renames F to F~ and writes a new F (emacs' default save); the stack sees both",
      GROUPS, bug=LP1879196)
def test_backup_by_rename(stack):
    rename_over_case(stack, save_backup_rename, with_backup=True, old_fd_reads_new=False)


@case("stack/012", "Host copies F to F~ and rewrites F in place (backup-by-copying, the control)",
      GROUPS, bug=LP1879196)
def test_copy_and_rewrite_in_place(stack):
    rename_over_case(stack, save_copy_in_place, with_backup=True, old_fd_reads_new=True)


@case("stack/013", "Host unlinks F and creates it again; the stack sees the new file",
      GROUPS, bug=LP1879196)
def test_unlink_and_create(stack):
    rename_over_case(stack, save_unlink_create, with_backup=False, old_fd_reads_new=False)


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
      GROUPS, bug=LP1879196)
def test_negative_entries(stack):
    with open(stack.host_path("H"), "wb") as f:
        f.write(CONTENT_A)
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
      GROUPS, bug=LP1879196)
def test_directory_renamed_on_underlay(stack):
    os.makedirs(stack.host_path("D"))
    with open(stack.host_path("D", "F"), "wb") as f:
        f.write(CONTENT_A)
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
