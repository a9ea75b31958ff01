"""stackfs semantics the scenarios rely on, checked directly on both modes."""

import errno
import mmap
import os

import pytest

from harness import container, scratch
from harness.fusedaemon import FuseDaemon, python_module


@pytest.fixture(params=["shift", "union"])
def stackfs(request, run_base):
    """(mode, mount point, underlay dir where files land, who works through it)."""
    pool = scratch.ScratchPool(os.path.join(run_base, "pool"))
    with pool.underlay("tmpfs") as under:
        os.chmod(under.root, 0o755)
        mnt, lower, upper = under.path("mnt"), under.path("lower"), under.path("upper")
        for d in (mnt, lower, upper):
            os.makedirs(d)
        if request.param == "shift":
            argv, lands, idmap = python_module("harness.stackfs", "shift", upper, mnt), upper, container.CONTAINER_MAP
        else:
            argv, lands, idmap = python_module("harness.stackfs", "union", lower, upper, mnt), upper, None
        daemon = FuseDaemon(argv, mnt, under.root, f"stackfs-{request.param}")
        daemon.start()
        try:
            yield request.param, mnt, lands, idmap
        finally:
            assert daemon.stop() is None
    pool.close()


def _mmap_roundtrip(mnt):
    path = os.path.join(mnt, "m")
    with open(path, "wb") as f:
        f.write(b"\0" * 8192)
    with open(path, "r+b") as f:
        with mmap.mmap(f.fileno(), 8192) as m:
            m[100:105] = b"hello"
            m.flush()
    with open(path, "rb") as f:
        return f.read()[100:105]


def test_mmap_writes_land(stackfs):
    mode, mnt, lands, idmap = stackfs
    assert container.run(_mmap_roundtrip, mnt, idmap=idmap) == b"hello"
    with open(os.path.join(lands, "m"), "rb") as f:
        assert f.read()[100:105] == b"hello"


def _tmpfile(mnt):
    try:
        os.close(os.open(mnt, os.O_TMPFILE | os.O_RDWR, 0o600))
    except OSError as e:
        return e.errno
    return 0


def _open_nofollow(path):
    with open(path, "wb") as f:
        f.write(b"regular")
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)  # as rsync opens what it replaces
    try:
        return os.read(fd, 16)
    finally:
        os.close(fd)


def test_o_nofollow_opens_a_regular_file(stackfs):
    mode, mnt, lands, idmap = stackfs
    assert container.run(_open_nofollow, os.path.join(mnt, "plain"), idmap=idmap) == b"regular"


def test_o_tmpfile_is_a_clean_eopnotsupp(stackfs):
    mode, mnt, lands, idmap = stackfs
    assert container.run(_tmpfile, mnt, idmap=idmap) in (0, errno.EOPNOTSUPP)


def _create(path):
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))


def test_inode_numbers_are_stable(stackfs):
    mode, mnt, lands, idmap = stackfs
    path = os.path.join(mnt, "stable")
    container.run(_create, path, idmap=idmap)
    first = os.stat(path).st_ino
    with open("/proc/sys/vm/drop_caches", "w") as f:  # the kernel forgets the inode; stackfs too
        f.write("2")
    assert os.stat(path).st_ino == first == os.stat(os.path.join(lands, "stable")).st_ino


def _write_fsync(mnt):
    fd = os.open(os.path.join(mnt, "synced"), os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, b"durable\n")
    os.fsync(fd)
    os.fdatasync(fd)
    os.close(fd)


def test_fsync_reaches_the_underlay(stackfs):
    mode, mnt, lands, idmap = stackfs
    container.run(_write_fsync, mnt, idmap=idmap)
    with open(os.path.join(lands, "synced"), "rb") as f:
        assert f.read() == b"durable\n"
