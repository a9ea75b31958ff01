"""S5, the healthy half: fsync, fdatasync and syncfs through the stack return 0.

On a healthy device every sync call through the stack succeeds, repeatedly,
from several fds and processes (the errseq rules only ever report an error
that happened).  The fault-injected half lives with the eio group.
"""

import os

from fixtures import Bug, case, check, step, syncfs

ERRSEQ = Bug("overlayfs and errseq: fsync/syncfs report each writeback error once per fd",
             link="https://lore.kernel.org/linux-unionfs/ (Nov 2020 thread on volatile mounts and syncfs)")
GROUPS = ("auto", "quick", "sync")
ROUNDS = 3


def _sync_everything(fd, who):
    for call, fn in (("fsync", os.fsync), ("fdatasync", os.fdatasync), ("syncfs", syncfs)):
        with step(f"{who}: {call}"):
            fn(fd)


def _process_with_file(channel, root, name):
    fd = os.open(os.path.join(root, name), os.O_CREAT | os.O_RDWR, 0o644)
    for round_ in range(ROUNDS):
        channel.send(f"round {round_} opened")
        channel.recv()
        with step(f"S5.1 {name}: write round {round_}"):
            os.write(fd, f"{name} round {round_}\n".encode())
        _sync_everything(fd, f"S5.1 {name} round {round_}")
    late = os.open(os.path.join(root, name), os.O_RDONLY)
    _sync_everything(late, f"S5.1 {name}: an fd opened after the writes")
    return os.fstat(fd).st_size


@case("stack/030", "Two processes write their own files and fsync/fdatasync/syncfs through the stack: "
      "0 every time", GROUPS, bug=ERRSEQ)
def test_healthy_sync_two_processes(stack):
    first = stack.start(_process_with_file, stack.path(), "F1")
    second = stack.start(_process_with_file, stack.path(), "F2", beside=first)
    try:
        for _ in range(ROUNDS):  # lockstep: both processes sync in every round
            for proc in (first, second):
                proc.recv()
            for proc in (first, second):
                proc.send("go")
        sizes = [first.result(), second.result()]
    finally:
        first.close()
        second.close()
    check(sizes[0] > 0 and sizes[1] > 0, "S5.1 both files hold their writes", f"sizes {sizes}")


def _ten_fds(root):
    path = os.path.join(root, "F")
    fds = [os.open(path, os.O_CREAT | os.O_RDWR, 0o644) for _ in range(10)]
    for round_ in range(2):
        for i, fd in enumerate(fds):
            with step(f"S5.2 fd {i}: write 64 KiB at its own offset (round {round_})"):
                os.pwrite(fd, bytes([65 + i]) * 65536, i * 65536)
            with step(f"S5.2 fd {i}: fsync (round {round_})"):
                os.fsync(fd)
    for fd in fds:
        os.close(fd)
    fd = os.open(path, os.O_RDWR)
    with step("S5.2 close, reopen, fsync"):
        os.fsync(fd)
    data = os.pread(fd, 10 * 65536, 0)
    check(all(data[i * 65536:(i + 1) * 65536] == bytes([65 + i]) * 65536 for i in range(10)),
          "S5.2 every fd's 64 KiB is in the file")


@case("stack/031", "Ten fds on one file each write 64 KiB and fsync through the stack (generic/441's shape, "
      "healthy): 0 every time", GROUPS, bug=ERRSEQ)
def test_healthy_fsync_ten_fds(stack):
    stack.run(_ten_fds, stack.path())
