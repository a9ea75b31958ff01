"""Scratch underlays: fresh, of the right type, and fully undone afterwards."""

import os
import subprocess

import pytest

from conftest import fake_probe
from harness import loopdev, mounts, scratch


def loop_devices_under(directory):
    return loopdev.backed_by(directory)


@pytest.fixture
def pool(tmp_path):
    p = scratch.ScratchPool(str(tmp_path / "pool"))
    yield p
    p.close()


@pytest.mark.parametrize("fstype", scratch.UNDERLAY_FILESYSTEMS)
def test_underlay_is_fresh_and_goes_away(pool, fstype, tmp_path):
    for _ in range(2):  # the second one must not see what the first left
        with pool.underlay(fstype) as under:
            (mount,) = [m for m in mounts.table() if m.mountpoint == under.root]
            assert mount.fstype == fstype
            assert set(os.listdir(under.root)) <= {"lost+found"}
            with open(under.path("marker"), "w") as f:
                f.write("written in this case")
            if fstype != "tmpfs":
                assert loop_devices_under(str(tmp_path)) == [under.device]
        assert not mounts.is_mountpoint(under.root)
        assert loop_devices_under(str(tmp_path)) == []
    assert not [name for name in os.listdir(pool.directory) if name.endswith(".img")]


def test_underlay_is_undone_when_the_case_fails(pool, tmp_path):
    with pytest.raises(RuntimeError, match="the case failed"):
        with pool.underlay("ext4") as under:
            raise RuntimeError("the case failed")
    assert not mounts.is_mountpoint(under.root)
    assert loop_devices_under(str(tmp_path)) == []


def test_mkfs_failure_leaves_no_device(pool, tmp_path):
    with pytest.raises(RuntimeError, match="mkfs.ext4"):
        with pool.underlay("ext4", mkfs_options=("-O", "no_such_feature")):
            pass
    assert loop_devices_under(str(tmp_path)) == []


def test_unavailable_names_the_missing_piece():
    probe = fake_probe()
    assert scratch.unavailable("btrfs", probe) == "kernel has no btrfs (not in /proc/filesystems)"
    probe.filesystems.append("xfs")
    assert scratch.unavailable("xfs", probe) == "mkfs.xfs not found on PATH"


def test_loop_device_autoclears_when_its_holder_dies(tmp_path):
    """A killed harness leaks no unmounted loop device: the kernel detaches it."""
    image = tmp_path / "img"
    image.write_bytes(b"")
    os.truncate(image, 1 << 20)
    code = ("import sys; from harness import loopdev; d = loopdev.LoopDevice(sys.argv[1]).attach(); "
            "print(d.path, flush=True); sys.stdin.read()")
    holder = subprocess.Popen([os.sys.executable, "-c", code, str(image)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=os.getcwd()))
    device = holder.stdout.readline().strip()
    assert loop_devices_under(str(tmp_path)) == [device]
    holder.kill()
    holder.wait()
    assert loop_devices_under(str(tmp_path)) == []
