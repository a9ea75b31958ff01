"""bench/stackfs: stackfs against its C peers and the kernel, in one run.

    ./bench/run stackfs [--mib 256] [--files 10000]

On a tmpfs underlay, for stackfs union and shift modes, kernel overlayfs, an
idmapped mount, fuse-overlayfs and bindfs (its uid/gid offset on, the same map
as the shifting stacks): sequential write and read of one file in 1 MiB
requests, create+stat of N files then their unlink, and readdir of N entries.
Printed as rates and as ratios of union mode to fuse-overlayfs and of shift
mode to bindfs (the peers in the same run).  Targets (issue 4): at least 0.5x
the C peer on sequential read and write, 0.3x on metadata, and shift mode
writing faster than bindfs.
"""

import argparse
import os
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from harness import container, mounts, rundir, scratch, syscalls  # noqa: E402
from harness.fusedaemon import FuseDaemon, python_module  # noqa: E402
from harness.stacks.idmapped import _userns  # noqa: E402

MIB = 1 << 20


def seq_write(mnt, mib):
    buf = b"\xa5" * MIB
    fd = os.open(os.path.join(mnt, "big"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    start = time.perf_counter()
    for _ in range(mib):
        os.write(fd, buf)
    os.fsync(fd)
    os.close(fd)
    return mib / (time.perf_counter() - start)


def seq_read(mnt, mib):
    fd = os.open(os.path.join(mnt, "preset"), os.O_RDONLY)  # made on the underlay: no stack cache
    start = time.perf_counter()
    while os.read(fd, MIB):
        pass
    os.close(fd)
    return mib / (time.perf_counter() - start)


def create_stat(mnt, files):
    d = os.path.join(mnt, "many")
    os.mkdir(d)
    start = time.perf_counter()
    for i in range(files):
        path = os.path.join(d, f"f{i}")
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))
        os.stat(path)
    created = files / (time.perf_counter() - start)
    start = time.perf_counter()
    for i in range(files):
        os.unlink(os.path.join(d, f"f{i}"))
    return created, files / (time.perf_counter() - start)


def readdir(mnt, files):
    start = time.perf_counter()
    count = sum(1 for _ in os.scandir(os.path.join(mnt, "listing")))
    assert count == files, count
    return files / (time.perf_counter() - start)


def prepare(source, mib, files):
    """What the read and readdir tests find: made directly on the underlay."""
    with open(os.path.join(source, "preset"), "wb") as f:
        for _ in range(mib):
            f.write(b"\x5a" * MIB)
    listing = os.path.join(source, "listing")
    os.mkdir(listing)
    for i in range(files):
        open(os.path.join(listing, f"e{i}"), "w").close()


class Subject:
    """One stack under test: mount() returns the mount point; unmount()."""

    def __init__(self, name, workdir):
        self.name, self.workdir = name, workdir
        self.mnt = os.path.join(workdir, "mnt")
        self.source = os.path.join(workdir, "source")
        self.lower, self.upper, self.work = (os.path.join(workdir, d) for d in ("lower", "upper", "work"))
        for d in (self.mnt, self.source, self.lower, self.upper, self.work):
            os.makedirs(d)
        self.daemon = None
        self.union = name in ("stackfs-union", "overlayfs", "fuse-overlayfs")
        self.data_dir = self.lower if self.union else self.source

    def mount(self):
        layers = f"lowerdir={self.lower},upperdir={self.upper},workdir={self.work}"
        if self.name == "overlayfs":
            syscalls.mount("stackcheck-bench", self.mnt, "overlay", 0, layers)
        elif self.name == "idmapped":
            tree = syscalls.open_tree(self.source, syscalls.OPEN_TREE_CLONE | syscalls.OPEN_TREE_CLOEXEC)
            syscalls.mount_setattr_idmap(tree, _userns(container.CONTAINER_MAP))
            syscalls.move_mount(tree, self.mnt)
            os.close(tree)
        else:
            argv, ready = {
                "stackfs-union": (python_module("harness.stackfs", "union", self.lower, self.upper, self.mnt), "fd"),
                "stackfs-shift": (python_module("harness.stackfs", "shift", self.source, self.mnt), "fd"),
                "fuse-overlayfs": (["fuse-overlayfs", "-f", "-o", layers, self.mnt], "mount"),
                "bindfs": (["bindfs", "-f", "--uid-offset=100000", "--gid-offset=100000",
                            self.source, self.mnt], "mount"),
            }[self.name]
            self.daemon = FuseDaemon(argv, self.mnt, self.workdir, self.name, ready=ready)
            self.daemon.start()
        return self.mnt

    def unmount(self):
        if self.daemon:
            self.daemon.stop()
        else:
            mounts.unmount(self.mnt)


def workload(mnt, mib, files):
    write = seq_write(mnt, mib)
    read = seq_read(mnt, mib)
    created, unlinked = create_stat(mnt, files)
    listed = readdir(mnt, files)
    return {"write MiB/s": write, "read MiB/s": read, "create+stat/s": created, "unlink/s": unlinked,
            "readdir entries/s": listed}


def measure(name, workdir, mib, files):
    subject = Subject(name, workdir)
    prepare(subject.data_dir, mib, files)
    mnt = subject.mount()
    try:
        # Shifting stacks are used by a container: its root is host 100000.
        idmap = None if subject.union else container.CONTAINER_MAP
        return container.run(workload, mnt, mib, files, idmap=idmap)
    finally:
        subject.unmount()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--files", type=int, default=10000)
    args = parser.parse_args()
    names = ["stackfs-union", "fuse-overlayfs", "overlayfs", "stackfs-shift", "bindfs", "idmapped"]
    names = [n for n in names if n not in ("fuse-overlayfs", "bindfs") or shutil.which(n)]
    run = rundir.RunDir.create()
    pool = scratch.ScratchPool(run.sub("pool"))
    results = {}
    try:
        for name in names:
            with pool.underlay("tmpfs", options="size=2g") as under:  # two big files and more
                results[name] = measure(name, under.path(name), args.mib, args.files)
    finally:
        pool.close()
        run.remove()
    metrics = list(next(iter(results.values())))
    print(f"{'stack (tmpfs underlay)':<22}" + "".join(f"{m:>19}" for m in metrics))
    for name, row in results.items():
        print(f"{name:<22}" + "".join(f"{row[m]:>19.0f}" for m in metrics))
    for ours, peer in (("stackfs-union", "fuse-overlayfs"), ("stackfs-shift", "bindfs")):
        if peer in results:
            ratios = "  ".join(f"{m.split()[0]} {results[ours][m] / results[peer][m]:.2f}x" for m in metrics)
            print(f"{ours} / {peer}: {ratios}")


if __name__ == "__main__":
    main()
