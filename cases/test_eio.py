"""S5 with a failing device: fsync reports a writeback error once to each fd.

The kernel's errseq rules (Documentation/filesystems/vfs.rst, "Handling
errors during writeback"): fsync(fd) reports a writeback error of the file
once per fd; fds opened before the error but that have not seen it still get
it.  The underlay lies on a faulty device; only the file's own data blocks
(found with FIEMAP) fail, so the filesystem itself stays healthy.
"""

import errno
import os
import shutil

from fixtures import (Bug, Needs, case, check, errname, errseq, expect_errno, fiemap_extents, log, read_on_device, step,
                      syncfs)

ERRSEQ = Bug("fsync/syncfs must report a writeback error once to each fd, through the stack "
             "(linux-unionfs, Nov 2020: overlayfs volatile mounts and syncfs; xfstests generic/441)",
             link="https://lore.kernel.org/linux-unionfs/")
GROUPS = ("auto", "eio")
# A volatile overlay skips sync calls by design: its own case (S5.4) holds its rules.
NEEDS = Needs(features=("faults",), filesystems=("ext4", "xfs"), not_traits=("volatile",))
CHUNK = 64 * 1024
FDS = 10


def _ten_fds(channel, root):
    path = os.path.join(root, "F")
    fds = [os.open(path, os.O_CREAT | os.O_RDWR, 0o644) for _ in range(FDS)]
    for i, fd in enumerate(fds):
        with step(f"S5.2 fd {i}: write 64 KiB at its own offset and fsync (healthy)"):
            os.pwrite(fd, bytes([65 + i]) * CHUNK, i * CHUNK)
            os.fsync(fd)
    channel.send("written")
    channel.recv()  # the device now fails this file's data blocks
    for i, fd in enumerate(fds):
        with step(f"S5.2 fd {i}: write again (into the page cache)"):
            os.pwrite(fd, bytes([97 + i]) * CHUNK, i * CHUNK)
    for i, fd in enumerate(fds):
        expect_errno(errno.EIO, f"S5.2 fd {i}: first fsync after the device failed", os.fsync, fd)
    for i, fd in enumerate(fds):
        with step(f"S5.2 fd {i}: second fsync: the error was reported to this fd already"):
            os.fsync(fd)
    channel.send("reported")
    channel.recv()  # healed
    for i, fd in enumerate(fds):
        with step(f"S5.2 fd {i}: write and fsync after healing"):
            os.pwrite(fd, bytes([48 + i]) * CHUNK, i * CHUNK)  # unlike both earlier versions
            os.fsync(fd)
        os.close(fd)
    fd = os.open(path, os.O_RDWR)
    with step("S5.2 close, reopen, fsync"):
        os.fsync(fd)
    return os.pread(fd, FDS * CHUNK, 0)


def _read(channel, path):
    with open(path, "rb") as f:
        return f.read()


@case("stack/040", "Ten fds on one file: after a writeback error each fsync through the stack reports EIO "
      "exactly once (generic/441's shape)", GROUPS, bug=ERRSEQ, needs=NEEDS)
def test_fsync_error_once_per_fd(stack):
    device = stack.underlay.faulty
    log(f"underlay: {stack.underlay.describe()}")
    log(f"faulty device: {device.describe()}; only F's data blocks fail (FIEMAP)")
    user = stack.start(_ten_fds, stack.path())
    try:
        check(user.recv() == "written", "S5.2 the file is written and synced")
        ranges = fiemap_extents(stack.on_underlay("F"))
        log(f"failing F's data: {ranges}")
        check(bool(ranges), "S5.2 FIEMAP finds F's data on the device")
        device.fail(ranges)
        user.send("failing")
        check(user.recv() == "reported", "S5.2 every fd got its EIO")
        device.heal()
        user.send("healed")
        data = user.result()
    finally:
        device.heal()
        user.close()
    synced = b"".join(bytes([48 + i]) * CHUNK for i in range(FDS))
    check(data == synced, "S5.2 after healing the file holds what each fd fsync'ed")
    with step("S5.5 unmount the stack and the underlay, mount both again"):
        stack.cycle()
    on_disk = read_on_device(stack.on_underlay("F"), stack.underlay.device)
    check(on_disk == synced, "S5.5 the device holds what fsync returned 0 for (read with O_DIRECT)",
          _first_difference(on_disk, synced))
    check(stack.start(_read, stack.path("F")).result() == synced,
          "S5.5 read through the mounted-again stack, the file holds what fsync returned 0 for")


def _first_difference(got, expected):
    if len(got) != len(expected):
        return f"{len(got)} bytes on disk, {len(expected)} fsync'ed"
    at = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), None)
    if at is None:
        return ""
    return f"first difference at byte {at}: {got[at:at + 8]!r} on disk, {expected[at:at + 8]!r} fsync'ed"



SECTOR = 4096
RAW_FDS = 3


def _direct_reads(device, start, count):
    """Read `count` sectors from `start` with O_DIRECT: {offset: bytes, or the errno}."""
    import mmap
    seen = {}
    buf = mmap.mmap(-1, SECTOR)  # page-aligned, as O_DIRECT needs
    fd = os.open(device, os.O_RDONLY | os.O_DIRECT)
    try:
        for offset in range(start, start + count * SECTOR, SECTOR):
            try:
                os.preadv(fd, [buf], offset)
                seen[offset] = bytes(buf)
            except OSError as e:
                seen[offset] = e.errno
    finally:
        os.close(fd)
        buf.close()
    return seen


@case("stack/041", "The faulty device fails exactly the chosen sectors and no others, and fsync on the block "
      "device reports a failed write once to each fd (checks the injector: generic/442's shape)",
      GROUPS, bug=ERRSEQ, needs=NEEDS)
def test_injector_fails_only_chosen_sectors(stack):
    device = stack.underlay.faulty
    log(f"faulty device: {device.describe()}")
    content = os.urandom(3 * CHUNK)
    probe_file = stack.underlay.path("injector-probe")
    with open(probe_file, "wb") as f:
        f.write(content)
    (start, length), *_ = fiemap_extents(probe_file)
    check(length >= 3 * CHUNK, "the probe file's data is one extent", f"extents {fiemap_extents(probe_file)}")
    bad = (start + CHUNK, CHUNK)  # the middle third: the probe file's own blocks, so the filesystem is untouched
    log(f"S5.3 failing bytes {bad[0]}..{bad[0] + bad[1]} of {device.path}")
    fds = [os.open(device.path, os.O_RDWR) for _ in range(RAW_FDS)]
    try:
        for i, fd in enumerate(fds):
            with step(f"S5.3 device fd {i}: write its own sector of the range and fsync (healthy)"):
                os.pwrite(fd, bytes([65 + i]) * SECTOR, bad[0] + i * SECTOR)
                os.fsync(fd)
        device.fail([bad])
        seen = _direct_reads(device.path, start, 3 * CHUNK // SECTOR)
        failing = sorted(offset for offset, got in seen.items() if got == errno.EIO)
        check(failing == list(range(bad[0], bad[0] + bad[1], SECTOR)),
              "S5.3 O_DIRECT reads fail (EIO) for exactly the chosen sectors",
              f"failing sectors {failing[:4]}... ({len(failing)}), chosen {bad}")
        healthy = b"".join(got for offset, got in sorted(seen.items()) if not bad[0] <= offset < bad[0] + bad[1])
        check(healthy == content[:CHUNK] + content[2 * CHUNK:], "S5.3 every other sector reads back what was written")
        for i, fd in enumerate(fds):
            with step(f"S5.3 device fd {i}: write its sector again (into the page cache)"):
                os.pwrite(fd, bytes([97 + i]) * SECTOR, bad[0] + i * SECTOR)
        for i, fd in enumerate(fds):
            expect_errno(errno.EIO, f"S5.3 device fd {i}: first fsync after the failed write", os.fsync, fd)
        for i, fd in enumerate(fds):
            with step(f"S5.3 device fd {i}: second fsync: reported to this fd already"):
                os.fsync(fd)
        device.heal()
        for i, fd in enumerate(fds):
            with step(f"S5.3 device fd {i}: write and fsync after healing"):
                os.pwrite(fd, bytes([48 + i]) * SECTOR, bad[0] + i * SECTOR)
                os.fsync(fd)
        seen = _direct_reads(device.path, bad[0], RAW_FDS)
        check([seen[bad[0] + i * SECTOR] for i in range(RAW_FDS)] == [bytes([48 + i]) * SECTOR for i in range(RAW_FDS)],
              "S5.3 after healing the device holds what each fd fsync'ed")
    finally:
        for fd in fds:
            os.close(fd)
        device.heal()


def _thread_process(channel, root, name, variant):
    """One of the thread's two processes: its own file, and syncfs/fsync on command."""
    fsync_rule, syncfs_rule = (errseq.expect(rule, variant) for rule in ("fsync", "syncfs"))
    path = os.path.join(root, name)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    with step(f"S5.1 {name}: write and fsync (healthy)"):
        os.pwrite(fd, b"h" * CHUNK, 0)
        os.fsync(fd)
    with step(f"S5.1 {name}: syncfs (healthy) returns 0"):
        syncfs(fd)
    channel.send("ready")
    while True:
        command = channel.recv()
        if command == "write":
            with step(f"S5.1 {name}: write into the failing blocks"):
                os.pwrite(fd, b"e" * CHUNK, 0)
            errseq.sync_call(fsync_rule, f"S5.1 {name}: fsync after the failed writeback", os.fsync, fd)
            errseq.sync_call(syncfs_rule, f"S5.1 {name}: syncfs after the failed writeback", syncfs, fd)
        elif command == "syncfs first":
            errseq.sync_call(syncfs_rule, f"S5.1 {name}: syncfs, the error not yet seen on this fd", syncfs, fd)
        elif command == "syncfs again":
            with step(f"S5.1 {name}: syncfs again: the error was reported to this fd already"):
                syncfs(fd)
            late = os.open(path, os.O_RDONLY)
            with step(f"S5.1 {name}: syncfs on an fd opened after the error was seen"):
                syncfs(late)
            os.close(late)
        elif command == "healed":
            with step(f"S5.1 {name}: write and fsync after healing"):
                os.pwrite(fd, b"H" * CHUNK, 0)
                os.fsync(fd)
            return os.pread(fd, CHUNK, 0)
        channel.send("done")


@case("stack/042", "Two processes through the stack: a failed writeback of one's file reaches its fsync and "
      "both processes' syncfs once each (the Nov 2020 thread's sequence)", GROUPS, bug=ERRSEQ, needs=NEEDS,
      rules=("fsync", "syncfs"))
def test_syncfs_error_once_per_process(stack):
    device = stack.underlay.faulty
    log(f"underlay: {stack.underlay.describe()}")
    log(f"faulty device: {device.describe()}; only F1's data blocks fail (FIEMAP)")
    first = stack.start(_thread_process, stack.path(), "F1", stack.variant)
    second = stack.start(_thread_process, stack.path(), "F2", stack.variant, beside=first)
    try:
        check(first.recv() == "ready" and second.recv() == "ready", "S5.1 both files written, syncfs 0")
        ranges = fiemap_extents(stack.on_underlay("F1"))
        log(f"failing F1's data: {ranges}")
        check(bool(ranges), "S5.1 FIEMAP finds F1's data on the device")
        device.fail(ranges)
        for proc, command in ((first, "write"), (second, "syncfs first"),
                              (first, "syncfs again"), (second, "syncfs again")):
            proc.send(command)
            check(proc.recv() == "done", f"S5.1 {command}")
        device.heal()
        for proc in (first, second):
            proc.send("healed")
        data = [first.result(), second.result()]
    finally:
        device.heal()
        first.close()
        second.close()
    check(data == [b"H" * CHUNK] * 2, "S5.1 after healing both files hold what was fsync'ed")


def _volatile_process(channel, root, variant):
    """Files written through a volatile overlay, synced through it on command."""
    rule = errseq.expect("volatile", variant)
    fds = {name: os.open(os.path.join(root, name), os.O_CREAT | os.O_RDWR, 0o644) for name in ("F", "G")}
    for name, fd in fds.items():
        with step(f"S5.4 {name}: write, fsync and syncfs through the volatile overlay: 0, nothing written back"):
            os.pwrite(fd, name.encode() * CHUNK, 0)
            os.fsync(fd)
            syncfs(fd)
    channel.send("written")
    while True:
        command = channel.recv()
        if command == "write F":
            with step("S5.4 F: write again through the overlay (the upper fs will fail writing it back)"):
                os.pwrite(fds["F"], b"f" * CHUNK, 0)
            with step("S5.4 F: fsync before the upper fs has written it back: 0"):
                os.fsync(fds["F"])
        elif command.startswith("sync"):
            when = command.split(" ", 1)[1]
            late = os.open(os.path.join(root, "G"), os.O_RDONLY)
            for name, fd in (*fds.items(), ("G (an fd opened now)", late)):
                for call, fn in (("fsync", os.fsync), ("fdatasync", os.fdatasync), ("syncfs", syncfs)):
                    for attempt in ("", " again"):
                        errseq.sync_call(rule, f"S5.4 {name}: {call}{attempt} {when}", fn, fd)
            os.close(late)
        elif command == "close":
            for fd in fds.values():
                os.close(fd)
            return None
        channel.send("done")


def _upper_syncfs(stack, description, expectation):
    """syncfs on the upper filesystem itself, outside the overlay: its writeback, driven by hand."""
    fd = os.open(stack.upper, os.O_RDONLY | os.O_DIRECTORY)
    try:
        errseq.sync_call(expectation, description, syncfs, fd)
    finally:
        os.close(fd)


@case("stack/043", "Volatile overlay: once the upper filesystem fails a writeback, fsync, fdatasync and syncfs "
      "through the overlay fail every time, even after healing, and the dirty workdir blocks a new mount "
      "until work/incompat/volatile is removed", GROUPS,
      bug=Bug("overlayfs volatile mounts: report upper writeback errors until remount (linux-unionfs, Nov 2020)",
              commit="335d3fc57941", link="https://lore.kernel.org/linux-unionfs/"),
      needs=Needs(features=("faults",), filesystems=("ext4", "xfs"), stack_traits=("volatile",)),
      rules=("volatile",))
def test_volatile_overlay_error_sticks(stack):
    healthy, failing = errseq.Expectation(False, "the upper fs is healthy"), errseq.expect("syncfs", "upper")
    device = stack.underlay.faulty
    log(f"underlay: {stack.underlay.describe()}")
    user = stack.start(_volatile_process, stack.path(), stack.variant)
    try:
        check(user.recv() == "written", "S5.4 F and G written through the overlay")
        _upper_syncfs(stack, "S5.4 syncfs on the upper fs (healthy): F and G reach the device", healthy)
        ranges = fiemap_extents(stack.on_underlay("F"))
        check(bool(ranges), "S5.4 FIEMAP finds F's data in the upper layer", f"{ranges}")
        user.send("write F")
        check(user.recv() == "done", "S5.4 F written again")
        device.fail(ranges)
        log(f"failing F's upper data: {ranges}")
        _upper_syncfs(stack, "S5.4 syncfs on the upper fs while F's blocks fail", failing)
        user.send("sync after the upper fs failed")
        check(user.recv() == "done", "S5.4 sync calls through the overlay after the failure")
        device.heal()
        user.send("sync after healing")
        check(user.recv() == "done", "S5.4 sync calls through the overlay after healing")
        user.send("close")
        user.result()
    finally:
        device.heal()
        user.close()
    stack.unmount()
    incompat = os.path.join(stack.work, "work", "incompat", "volatile")
    check(os.path.isdir(incompat), "S5.4 the dirty volatile workdir is marked", f"no {incompat}")
    try:
        stack.mount()
    except OSError as e:
        log(f"S5.4 mounting again over the dirty workdir: {errname(e.errno)}, as it must")
    else:
        check(False, "S5.4 mounting again over the dirty workdir must fail until work/incompat/volatile is "
                     "removed", "the mount succeeded")
    with step("S5.4 remove work/incompat/volatile and mount again"):
        shutil.rmtree(incompat)
        stack.mount()
    check(stack.start(_read, stack.path("G")).result() == b"G" * CHUNK, "S5.4 G reads back after the new mount")
    with step("S5.4 F is readable after the new mount"):
        stack.start(_read, stack.path("F")).result()
