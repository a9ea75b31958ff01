"""S5 with a failing device: fsync reports a writeback error once to each fd.

The kernel's errseq rules (Documentation/filesystems/vfs.rst, "Handling
errors during writeback"): fsync(fd) reports a writeback error of the file
once per fd; fds opened before the error but that have not seen it still get
it.  The underlay lies on a faulty device; only the file's own data blocks
(found with FIEMAP) fail, so the filesystem itself stays healthy.
"""

import errno
import os

from fixtures import Bug, Needs, case, check, expect_errno, fiemap_extents, log, step

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
            os.pwrite(fd, bytes([65 + i]) * CHUNK, i * CHUNK)
            os.fsync(fd)
        os.close(fd)
    fd = os.open(path, os.O_RDWR)
    with step("S5.2 close, reopen, fsync"):
        os.fsync(fd)
    return os.pread(fd, FDS * CHUNK, 0)


@case("stack/040", "Ten fds on one file: after a writeback error each fsync through the stack reports EIO "
      "exactly once (generic/441's shape)", GROUPS, bug=ERRSEQ, needs=NEEDS)
def test_fsync_error_once_per_fd(stack):
    device = stack.underlay.faulty
    log(f"underlay on {device.describe()}; only F's data blocks fail (FIEMAP), the journal stays healthy")
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
    check(data == b"".join(bytes([65 + i]) * CHUNK for i in range(FDS)),
          "S5.5 what was fsync'ed after healing is what the file holds")



@case("stack/041", "The faulty device fails exactly the chosen sectors and no others (checks the injector, "
      "generic/442's role)", GROUPS, bug=ERRSEQ, needs=NEEDS)
def test_injector_fails_only_chosen_sectors(stack):
    probe_file = stack.underlay.path("injector-probe")
    with open(probe_file, "wb") as f:
        f.write(os.urandom(3 * CHUNK))
    (start, length), *_ = fiemap_extents(probe_file)
    device = stack.underlay.faulty
    bad = (start + CHUNK, CHUNK)  # the middle third of the file
    device.fail([bad])
    try:
        fd = os.open(device.path, os.O_RDONLY | os.O_DIRECT)
        try:
            import mmap
            buf = mmap.mmap(-1, 4096)
            for offset, should_fail in ((start, False), (bad[0], True), (bad[0] + CHUNK - 4096, True),
                                        (bad[0] + CHUNK, False)):
                os.lseek(fd, offset, os.SEEK_SET)
                if should_fail:
                    expect_errno(errno.EIO, f"read the failing sector at {offset}", os.readv, fd, [buf])
                else:
                    with step(f"read the healthy sector at {offset}"):
                        os.readv(fd, [buf])
        finally:
            os.close(fd)
    finally:
        device.heal()
