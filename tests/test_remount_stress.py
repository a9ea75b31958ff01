"""Mounting a stack again over the same layers never finds them busy, whatever
other workers' containers hold (issue: overlayfs refused an upperdir still in
use by a copy of an earlier mount in another worker's container, EBUSY)."""

import os
import tempfile

import pytest

from conftest import NO_TRACES, harness_traces, waits_for
from harness import container, mounts, syscalls

ROUNDS = 50


@waits_for(900)
def test_remounts_at_j2_with_containers_never_find_the_layers_busy(check):
    """Every overlay variant (index=on included) x ext4 and tmpfs, ROUNDS rounds each
    of remount (and unmount+mount of the underlay too, on ext4) while both workers'
    containers come and go: every mount must succeed and every superblock go."""
    check.env["STACKCHECK_SELFTEST_REMOUNTS"] = str(ROUNDS)
    done = check("selftest/010", "--stack", "overlay*", "--underlay", "ext4", "--underlay", "tmpfs",
                 "-j", "2", selftest=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr
    assert "Passed all 6 tests" in done.stdout
    assert "EBUSY" not in done.stdout + done.stderr
    assert harness_traces(check.run_base) == NO_TRACES


def _hold(channel):
    channel.send("holding")
    channel.recv()


def test_a_filesystem_held_elsewhere_is_named_after_a_bounded_wait():
    """Outside a run's shared mount, a container's private copy keeps the filesystem
    alive after our umount: the wait ends and names that container."""
    directory = tempfile.mkdtemp(prefix="stackcheck-test-held-")
    syscalls.mount("stackcheck-test", directory, "tmpfs", 0, "size=1m")
    holder = container.start(_hold, idmap=container.CONTAINER_MAP)
    try:
        assert holder.recv() == "holding"
        watch = mounts.SuperblockWatch(directory, "a tmpfs held by a container")
        try:
            mounts.unmount(directory)
            with pytest.raises(mounts.StillMounted) as caught:
                watch.wait_gone(timeout=0.5)
            assert f"mount namespace of pid {holder.pid}" in str(caught.value)
            holder.close()
            watch.wait_gone(timeout=5)  # the copy went with the container
        finally:
            watch.close()
    finally:
        holder.close()
        mounts.unmount(directory)
        os.rmdir(directory)
