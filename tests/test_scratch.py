"""Scratch underlays: fresh, of the right type, and fully undone afterwards."""

import os
import subprocess

import pytest

from conftest import fake_probe
from harness import loopdev, mounts, scratch, zram


def loop_devices_under(directory):
    return loopdev.backed_by(directory)


@pytest.fixture
def pool(tmp_path):
    p = scratch.ScratchPool(str(tmp_path / "pool"))
    yield p
    p.close()


def zram_devices():
    return sorted(name for name in os.listdir("/sys/block") if name.startswith("zram"))


@pytest.mark.parametrize("kind", scratch.UNDERLAYS)
def test_underlay_is_fresh_and_goes_away(pool, kind, tmp_path):
    if kind in scratch.ON_ZRAM and zram.unavailable():
        pytest.skip(zram.unavailable())
    others_zram = zram_devices()
    for _ in range(2):  # the second one must not see what the first left
        with pool.underlay(kind) as under:
            (mount,) = [m for m in mounts.table() if m.mountpoint == under.root]
            assert mount.fstype == scratch.filesystem_of(kind)
            assert set(os.listdir(under.root)) <= {"lost+found"}
            with open(under.path("marker"), "w") as f:
                f.write("written in this case")
            if kind in scratch.ON_ZRAM:
                assert under.device.startswith("/dev/zram") and under.device[5:] not in others_zram
                assert "zram" in under.describe()
            elif kind != "tmpfs":
                assert loop_devices_under(str(tmp_path)) == [under.device]
        assert not mounts.is_mountpoint(under.root)
        assert loop_devices_under(str(tmp_path)) == []
        assert zram_devices() == others_zram  # ours removed, nobody else's touched
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
    probe.set("zram", False, "no zram: /sys/class/zram-control is missing")
    assert scratch.unavailable("ext4-zram", probe) == "no zram: /sys/class/zram-control is missing"


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


def test_recorded_zram_device_that_is_not_ours_is_left_alone(tmp_path):
    """A crashed run's record names a number; if that device now carries someone
    else's filesystem, recovery must not remove it."""
    if zram.unavailable():
        pytest.skip(zram.unavailable())
    other = zram.ZramDevice(str(tmp_path)).create(64 << 20)
    try:
        subprocess.run(["mkfs.ext4", "-q", "-L", "not-ours", other.path], check=True)
        assert zram.remove_recorded(str(tmp_path)) == []
        assert os.path.exists(f"/sys/block/zram{other.number}")
        subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "stackcheck", other.path], check=True)
        assert zram.remove_recorded(str(tmp_path)) == [other.path]
        assert not os.path.exists(f"/sys/block/zram{other.number}")
    finally:
        if os.path.exists(f"/sys/block/zram{other.number}"):
            zram.remove(other.number)
