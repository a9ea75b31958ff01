"""The bundled faulty device (fusedev): exact failing ranges, and a clean teardown
even after the filesystem on it has failed writes."""

import errno
import os

import pytest

from conftest import NO_TRACES, harness_traces
from harness import fiemap, scratch
from harness.faults.fusedev import FuseDev


@pytest.fixture
def pool(run_base):
    p = scratch.ScratchPool(os.path.join(run_base, "pool"))
    yield p
    p.close()


def test_fiemap_finds_the_data_and_failures_hit_only_it(pool, run_base):
    with pool.underlay("ext4", fault_backend=FuseDev) as under:
        path = under.path("data")
        with open(path, "wb") as f:
            f.write(b"x" * 65536)
        ((start, length),) = fiemap.extents(path)
        assert length == 65536
        under.faulty.fail([(start, length)])
        fd = os.open(path, os.O_WRONLY)
        os.pwrite(fd, b"y" * 65536, 0)
        with pytest.raises(OSError) as err:
            os.fsync(fd)
        assert err.value.errno == errno.EIO
        other = under.path("other")
        with open(other, "wb") as f:  # data elsewhere on the device is written fine
            f.write(b"z" * 65536)
            f.flush()
            os.fsync(f.fileno())
        os.close(fd)
        under.faulty.heal()
    pool.close()
    assert harness_traces(run_base) == NO_TRACES


def test_dropped_writes_succeed_and_vanish_only_in_their_range(pool, run_base):
    """drop_writes (dm-flakey's drop_writes): fsync says 0, the device keeps the old data."""
    with pool.underlay("ext4", fault_backend=FuseDev) as under:
        path = under.path("data")
        with open(path, "wb") as f:
            f.write(b"x" * 3 * 65536)
        ((start, _),) = fiemap.extents(path)
        under.faulty.drop_writes([(start + 65536, 65536)])
        fd = os.open(path, os.O_WRONLY)
        os.pwrite(fd, b"y" * 3 * 65536, 0)
        os.fsync(fd)  # no error: the device claims the writes
        os.close(fd)
        assert fiemap.read_on_device(path, under.device) == b"y" * 65536 + b"x" * 65536 + b"y" * 65536
        under.faulty.heal()
    pool.close()
    assert harness_traces(run_base) == NO_TRACES


def test_teardown_while_every_write_fails(pool, run_base):
    with pool.underlay("ext4", fault_backend=FuseDev) as under:
        with open(under.path("f"), "wb") as f:
            f.write(b"dirty" * 1000)
        under.faulty.fail_all()  # umount's writeback fails: teardown must still finish
    pool.close()
    assert harness_traces(run_base) == NO_TRACES


def test_a_hung_fuse_daemon_is_aborted_then_killed(run_base):
    """A daemon that stops answering (SIGSTOP) cannot keep its mount or itself alive."""
    import signal
    from harness.fusedaemon import FuseDaemon, python_module
    source, mnt = os.path.join(run_base, "src"), os.path.join(run_base, "mnt")
    os.makedirs(source)
    os.makedirs(mnt)
    daemon = FuseDaemon(python_module("harness.stackfs", "shift", source, mnt), mnt, run_base, "stackfs",
                        stop_wait=2)
    daemon.start()
    proc = daemon.proc
    os.kill(proc.pid, signal.SIGSTOP)
    assert daemon.stop() == "stackfs hung after its unmount; connection aborted through fusectl"
    assert proc.poll() is not None
    assert harness_traces(run_base) == NO_TRACES


def _hold(channel):
    channel.send("holding")
    channel.recv()


def test_a_mount_held_by_another_namespace_is_no_hang(run_base):
    """A container made by a case on another worker copies every mount there was, this
    daemon's too: its connection is ended at once, and that is not reported as a hang."""
    from harness import container
    from harness.fusedaemon import FuseDaemon, python_module
    source, mnt = os.path.join(run_base, "src"), os.path.join(run_base, "mnt")
    os.makedirs(source)
    os.makedirs(mnt)
    daemon = FuseDaemon(python_module("harness.stackfs", "shift", source, mnt), mnt, run_base, "stackfs",
                        stop_wait=600)  # a hang would end this test by pytest's timeout, not pass it
    daemon.start()
    holder = container.start(_hold, idmap=container.CONTAINER_MAP)
    try:
        assert holder.recv() == "holding"
        proc = daemon.proc
        assert daemon.stop() is None
        assert proc.poll() is not None
    finally:
        holder.close()
    assert harness_traces(run_base) == NO_TRACES
