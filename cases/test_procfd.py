"""S1: reopening deleted files through /proc/<pid>/fd (LP#1872757).

shiftfs revalidated dentries so aggressively that an open but unlinked file
(nlink 0) looked stale: reopening it through the /proc magic link takes the
LOOKUP_JUMPED / d_weak_revalidate path and failed with ESTALE.  Temporary
files hit it.  Correct: no ESTALE anywhere, the data is equal, every fd's
fstat gives nlink 0 and one inode.
"""

import errno
import os

import pytest

from fixtures import Repro, Bug, case, check, expect_errno, linkat_follow, step

LP1872757 = Bug("shiftfs: reopening an unlinked file through /proc/<pid>/fd fails with ESTALE",
                lp=1872757, link="https://bugs.launchpad.net/bugs/1872757")
GROUPS = ("auto", "quick", "procfd")
DATA = b"stackcheck S1: written before unlink\n"
REOPEN_MODES = (("O_RDONLY", os.O_RDONLY), ("O_RDWR", os.O_RDWR),
                ("O_WRONLY|O_APPEND", os.O_WRONLY | os.O_APPEND))


UNLINKED_REOPEN = """
def unlinked(name):
    path = os.path.join(MNT, name)
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
    os.write(fd, b"written before unlink\\n")
    os.unlink(path)
    yield os.getpid(), fd


def reopen(pid, fd):
    seen = {}
    for mode, flags in (("O_RDONLY", os.O_RDONLY), ("O_RDWR", os.O_RDWR),
                        ("O_WRONLY|O_APPEND", os.O_WRONLY | os.O_APPEND)):
        again = attempt(lambda: os.open(f"/proc/{pid}/fd/{fd}", flags))
        seen[f"open /proc/{'self' if pid == os.getpid() else 'PID'}/fd/N {mode}"] = again if isinstance(again, str) else "ok"
        if not isinstance(again, str):
            seen[f"nlink through the {mode} fd"] = os.fstat(again).st_nlink
    yield seen


def judge(seen):
    for what, got in seen.items():
        show(what, got, 0 if what.startswith("nlink") else "ok")
"""


def _create_and_unlink(root, name="F"):
    path = os.path.join(root, name)
    with step(f"S1.1 create {name} through the stack and write to it (fd A)"):
        fd_a = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
        os.write(fd_a, DATA)
    with step(f"S1.1 unlink {name}, keeping fd A open"):
        os.unlink(path)
    return fd_a


def _reopen_all_modes(proc_link, fd_a, who):
    """Open proc_link in each mode; read and write through each; check through fd A."""
    fds = []
    for label, flags in REOPEN_MODES:
        with step(f"{who}: open {proc_link} {label}"):
            fd = os.open(proc_link, flags)
        fds.append(fd)
        if not flags & (os.O_WRONLY | os.O_RDWR) or flags & os.O_RDWR:
            with step(f"{who}: read through the {label} fd"):
                data = os.pread(fd, 1 << 16, 0)
            check(data.startswith(DATA), f"{who}: the {label} fd reads the data written before unlink",
                  f"read {data[:60]!r}")
        if flags & (os.O_WRONLY | os.O_RDWR):
            extra = f"{who}: written through {label}\n".encode()
            with step(f"{who}: write through the {label} fd"):
                if flags & os.O_APPEND:
                    os.write(fd, extra)
                else:
                    os.pwrite(fd, extra, os.fstat(fd).st_size)
            with step(f"{who}: read fd A back"):
                seen = os.pread(fd_a, 1 << 16, 0)
            check(extra in seen, f"{who}: what the {label} fd wrote is seen through fd A",
                  f"fd A reads {seen[-80:]!r}")
    return fds


def _check_same_unlinked_inode(fds, who):
    stats = []
    for fd in fds:
        with step(f"{who}: fstat fd {fd}"):
            stats.append(os.fstat(fd))
    check({(s.st_dev, s.st_ino) for s in stats} == {(stats[0].st_dev, stats[0].st_ino)},
          f"{who}: all fds are the same inode", f"got {[(s.st_dev, s.st_ino) for s in stats]}")
    check(all(s.st_nlink == 0 for s in stats), f"{who}: all fds show nlink 0",
          f"got nlink {[s.st_nlink for s in stats]}")


def _reopen_in_this_process(root):
    fd_a = _create_and_unlink(root)
    fds = _reopen_all_modes(f"/proc/self/fd/{fd_a}", fd_a, "S1.2")
    _check_same_unlinked_inode([fd_a] + fds, "S1.2")


@case("stack/001", "Reopen an unlinked file through /proc/self/fd in every open mode",
      GROUPS, bug=LP1872757, repro=Repro(
          "an unlinked file held open reopens through /proc/self/fd in every mode, and every fd shows nlink 0",
          UNLINKED_REOPEN + """
def both(name):
    pid, fd = next(unlinked(name))
    yield from reopen(pid, fd)
user = in_container(both, "F")
judge(user.next())
user.close()
"""))
def test_reopen_unlinked_through_proc_self_fd(stack):
    stack.run(_reopen_in_this_process, stack.path())


def _second_process(pid, fd_a):
    link = f"/proc/{pid}/fd/{fd_a}"
    who = "S1.3 second process"
    with step(f"{who}: open {link} O_RDONLY to read back through"):
        fd_r = os.open(link, os.O_RDONLY)
    fds = _reopen_all_modes(link, fd_r, who)
    _check_same_unlinked_inode([fd_r] + fds, who)


def _reopen_from_another_process(channel, root):
    fd_a = _create_and_unlink(root)
    channel.send((os.getpid(), fd_a))  # the second process opens our fd A
    channel.recv()
    with step("S1.3 read fd A after the second process wrote"):
        seen = os.pread(fd_a, 1 << 16, 0)
        st = os.fstat(fd_a)
    check(b"S1.3 second process: written through O_RDWR" in seen,
          "S1.3 fd A sees what the second process wrote", f"fd A reads {seen[-80:]!r}")
    check(st.st_nlink == 0, "S1.3 fd A still shows nlink 0", f"got {st.st_nlink}")


@case("stack/002", "Reopen an unlinked file through /proc/<pid>/fd from a second process",
      GROUPS, bug=LP1872757, repro=Repro(
          "another process of the same container reopens an unlinked file through /proc/<pid>/fd in every "
          "mode, and every fd shows nlink 0",
          UNLINKED_REOPEN + """
first = in_container(unlinked, "F")
pid, fd = first.next()
second = in_container(reopen, pid, fd, beside=first)
judge(second.next())
second.close()
first.close()
"""))
def test_reopen_unlinked_from_second_process(stack):
    first = stack.start(_reopen_from_another_process, stack.path())
    try:
        pid, fd_a = first.recv()
        stack.run(_second_process, pid, fd_a, beside=first)
        first.send("done")
        first.result()
    finally:
        first.close()


def _tmpfile_reopen_and_link(root):
    with step("S1.4 open an O_TMPFILE file in the stack's root"):
        try:
            fd_t = os.open(root, os.O_TMPFILE | os.O_RDWR, 0o644)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.EISDIR):
                return f"the stack does not support O_TMPFILE ({errno.errorcode[e.errno]})"
            raise
        os.write(fd_t, DATA)
    fds = _reopen_all_modes(f"/proc/self/fd/{fd_t}", fd_t, "S1.4")
    _check_same_unlinked_inode([fd_t] + fds, "S1.4")
    target = os.path.join(root, "T")
    with step("S1.4 linkat /proc/self/fd/N to T with AT_SYMLINK_FOLLOW"):
        linkat_follow(f"/proc/self/fd/{fd_t}", target)
    with step("S1.4 read T through the stack"):
        with open(target, "rb") as f:
            data = f.read()
    check(data.startswith(DATA), "S1.4 T shows the data through the stack", f"read {data[:60]!r}")
    with step("S1.4 fstat the O_TMPFILE fd after linkat"):
        nlink = os.fstat(fd_t).st_nlink
    check(nlink == 1, "S1.4 the linked O_TMPFILE inode has nlink 1", f"got {nlink}")
    return None


@case("stack/003", "O_TMPFILE reopened through /proc/self/fd, then linked in with linkat",
      GROUPS, bug=LP1872757)
def test_tmpfile_reopen_and_linkat(stack):
    unsupported = stack.run(_tmpfile_reopen_and_link, stack.path())
    if unsupported:
        pytest.skip(unsupported)
    with step("S1.4 read T on the underlay"):
        with open(stack.on_underlay("T"), "rb") as f:
            data = f.read()
    check(data.startswith(DATA), "S1.4 T shows the data on the underlay", f"read {data[:60]!r}")


def _removed_directory(root):
    path = os.path.join(root, "D")
    with step("S1.5 mkdir D through the stack and open it"):
        os.mkdir(path)
        fd_d = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    with step("S1.5 rmdir D, keeping it open"):
        os.rmdir(path)
    with step("S1.5 fstat the removed directory"):
        st = os.fstat(fd_d)
    check(st.st_ino != 0, "S1.5 fstat of the removed directory works")
    with step("S1.5 reopen the removed directory through /proc/self/fd"):
        os.close(os.open(f"/proc/self/fd/{fd_d}", os.O_RDONLY | os.O_DIRECTORY))
    expect_errno(errno.ENOENT, "S1.5 create a file under the removed directory",
                 os.open, "X", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd_d)


@case("stack/004", "A removed directory held open: fstat works, creating under it fails with ENOENT",
      GROUPS, bug=LP1872757, repro=Repro(
          "fstat of a removed directory held open works, and creating a file under it fails with ENOENT",
          """
def removed():
    path = os.path.join(MNT, "D")
    os.mkdir(path)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    os.rmdir(path)
    yield {"fstat of the removed directory": attempt(lambda: "ok" if os.fstat(fd).st_ino else "inode 0"),
           "create X under it": attempt(lambda: os.open("X", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd) and "created")}
user = in_container(removed)
seen = user.next()
show("fstat of the removed directory", seen["fstat of the removed directory"], "ok")
show("create X under it", seen["create X under it"], "ENOENT")
user.close()
"""))
def test_removed_directory_held_open(stack):
    stack.run(_removed_directory, stack.path())
