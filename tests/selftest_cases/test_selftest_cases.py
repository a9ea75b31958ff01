"""Cases that exist only to test the harness: each behaves in one known way.

The harness's tests run them through ./check --case-dir; they are not part of
the suite.
"""

import errno
import os

import pytest

from fixtures import Needs, case, check, expect_errno, log, step
from harness import container, kmsg

GROUPS = ("selftest",)


def _open_missing(root):
    with step("selftest: open a file that was never created"):
        os.open(os.path.join(root, "missing"), os.O_RDONLY)


@case("selftest/001", "Fails at a named step with ENOENT", GROUPS)
def test_fails_with_errno(stack):
    stack.run(_open_missing, stack.path())


@case("selftest/002", "Needs a kernel from the future", GROUPS, needs=Needs(min_kernel="99.0"))
def test_needs_future_kernel(stack):
    raise AssertionError("selftest/002 must never run")


@case("selftest/003", "The kernel logs a WARNING during the case", GROUPS)
def test_kernel_warning(stack, stackcheck_run):
    kmsg.inject("WARNING: injected by selftest/003", stackcheck_run.run.run_id)


def _list_root(root):
    expect_errno(errno.ENOENT, "selftest: stat a missing name", os.stat, os.path.join(root, "missing"))
    return os.listdir(root)


@case("selftest/004", "Passes", GROUPS)
def test_passes(stack):
    stack.run(_list_root, stack.path())


def _announce_then_block(fifo):
    with open(fifo, "w") as f:  # returns once the test opens the FIFO to read
        f.write("mounted\n")
    os.open(fifo + ".never", os.O_RDONLY)  # a FIFO no one writes: blocks until killed


@case("selftest/005", "Blocks inside the stack user's process, with the stack mounted, until signalled",
      GROUPS)
def test_blocks_until_signalled(stack):
    stack.run(_announce_then_block, os.environ["STACKCHECK_SELFTEST_FIFO"])


@case("selftest/006", "The stack's FUSE daemon dies during the case", GROUPS)
def test_daemon_dies(stack):
    daemon = getattr(stack, "daemon", None)
    if daemon is None:
        pytest.skip(f"{stack.variant} has no daemon")
    daemon.proc.kill()
    daemon.proc.wait()
    expect_errno(errno.ENOTCONN, "selftest: the dead stack answers ENOTCONN", os.stat, stack.path())


@case("selftest/007", "Fails on its first attempt only (a flaky case)", GROUPS)
def test_fails_once(stack):
    marker = os.environ["STACKCHECK_SELFTEST_FLAKY"]
    if not os.path.exists(marker):
        open(marker, "w").close()
        raise AssertionError("selftest/007: first attempt fails on purpose")


@case("selftest/008", "The fault backend's drop_writes: fsync says 0 and the device keeps the old data, "
      "in the chosen range only", GROUPS, needs=Needs(features=("faults",), filesystems=("ext4",)))
def test_fault_backend_drops_writes(stack):
    from harness.fiemap import extents, read_on_device
    device = stack.underlay.faulty
    log(f"faulty device: {device.describe()}")
    path = stack.underlay.path("dropped")
    with open(path, "wb") as f:
        f.write(b"x" * 3 * 65536)
    ((start, _),) = extents(path)
    device.drop_writes([(start + 65536, 65536)])
    try:
        with step("selftest: overwrite the file and fsync while its middle third drops writes"):
            fd = os.open(path, os.O_WRONLY)
            os.pwrite(fd, b"y" * 3 * 65536, 0)
            os.fsync(fd)
            os.close(fd)
        on_disk = read_on_device(path, device.path)
    finally:
        device.heal()
    check(on_disk == b"y" * 65536 + b"x" * 65536 + b"y" * 65536,
          "selftest: only the middle third kept its old data on the device")


def _wait_forever(channel):
    channel.send("started")
    channel.recv()  # nobody ever sends: the harness must end this process


@case("selftest/009", "Fails while a stack user it started is still running", GROUPS)
def test_fails_with_a_user_left_running(stack):
    user = stack.start(_wait_forever)
    check(user.recv() == "started", "selftest: the stack user runs")
    check(False, "selftest: fail with the stack user still running")


def _hold_a_copy(channel, root):
    os.listdir(root)
    channel.send("holding")
    channel.recv()  # until ended: meanwhile its mount namespace holds copies of every mount


@case("selftest/010", "Mounts the stack again and again over the same layers while containers of its "
      "own and of other workers hold copies of the mounts", GROUPS)
def test_remount_under_containers(stack):
    rounds = int(os.environ.get("STACKCHECK_SELFTEST_REMOUNTS", "50"))
    for i in range(rounds):
        with open(stack.host_path(f"laid-out-{i}"), "w") as f:
            f.write("x")
        # A container of another case (as on another worker) lives on across the remount.
        bystander = container.start(_hold_a_copy, stack.path(), idmap=container.CONTAINER_MAP)
        try:
            check(bystander.recv() == "holding", "selftest: another container holds a copy of the mounts")
            check(stack.start(_hold_a_copy, stack.path()).recv() == "holding", "selftest: the stack's user runs")
            with step(f"selftest: round {i}: mount the stack again"):
                stack.remount()
            if stack.underlay.device is not None and "volatile" not in stack.variant_traits(stack.variant):
                with step(f"selftest: round {i}: unmount the stack and the underlay, mount both again"):
                    stack.cycle()
        finally:
            bystander.close()
        check(os.path.exists(stack.path(f"laid-out-{i}")), f"selftest: round {i}: the layers show through")


@case("selftest/011", "Declares a rule that is a known gap on overlayfs, and passes", GROUPS, rules=("syncfs",))
def test_passes_under_a_gap_rule(stack):
    stack.run(_list_root, stack.path())
