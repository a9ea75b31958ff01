"""Scratch underlays: ext4, xfs and btrfs on loop devices, and tmpfs.

A pool belongs to one worker.  Every case gets a new sparse image, a new loop
device and a fresh mkfs: all three cost milliseconds.  Reusing one device per
worker is not safe: a container process's mount namespace holds a copy of the
underlay mount, and when it exits the kernel drops that copy a moment later
(delayed mntput), so the filesystem can outlive our umount(2) briefly and keep
the device busy and still writing.  A new device per case never races it.

Most images live on a tmpfs of the pool's own: a loop device passes every
flush (mkfs's fsync, umount's sync) on to its backing file, and on a disk
that is a real cache flush per case.  xfs images stay on the run directory's
disk: mkfs.xfs zeroes its 64 MiB log with BLKZEROOUT, which a disk
filesystem turns into a free fallocate while tmpfs must write every page
(measured: 19 ms per case on disk, 41 ms on tmpfs).
"""

import contextlib
import logging
import os
import shutil
import subprocess

from harness import loopdev, mounts, syscalls
from harness.rundir import TAG

log = logging.getLogger("stackcheck.scratch")

IMAGE_SIZE = 512 << 20
# Sparse images use memory only for what is written.
IMAGES_TMPFS_SIZE = "8g"
IMAGES_ON_DISK = ("xfs",)
MKFS = {
    "ext4": ["mkfs.ext4", "-q", "-F", "-E", "nodiscard,lazy_itable_init=1,lazy_journal_init=1"],
    "xfs": ["mkfs.xfs", "-q", "-f", "-K"],
    "btrfs": ["mkfs.btrfs", "-q", "-f", "-K"],
}
UNDERLAY_FILESYSTEMS = ("ext4", "xfs", "btrfs", "tmpfs")


def unavailable(fstype, probe):
    """Why this machine cannot build an underlay of fstype, or None."""
    if fstype not in probe.filesystems:
        return f"kernel has no {fstype} (not in /proc/filesystems)"
    if fstype in MKFS:
        if not probe.tools.get(MKFS[fstype][0]):
            return f"{MKFS[fstype][0]} not found on PATH"
        if not probe.feature("loop"):
            return probe.reason("loop")
    return None


class Underlay:
    """A mounted scratch filesystem."""

    def __init__(self, fstype, root, device=None, options="", faulty=None):
        self.fstype = fstype
        self.root = root
        self.device = device
        self.options = options
        self.faulty = faulty  # the fault backend's device, for the eio cases

    def path(self, *parts):
        return os.path.join(self.root, *parts)

    def describe(self):
        where = f" on {self.device}" if self.device else ""
        return f"{self.fstype}{where} at {self.root} (options: {self.options or 'defaults'})"


class ScratchPool:
    def __init__(self, directory):
        self.directory = directory
        self.images = os.path.join(directory, "images")
        os.makedirs(self.images, exist_ok=True)
        self._images_mounted = False
        self._serial = 0

    def _image_dir(self, fstype):
        if fstype in IMAGES_ON_DISK:
            return self.directory
        if not self._images_mounted:
            syscalls.mount(f"{TAG}-images", self.images, "tmpfs", 0, f"size={IMAGES_TMPFS_SIZE},mode=0700")
            self._images_mounted = True
        return self.images

    def _new_device(self, fstype):
        self._serial += 1
        image = os.path.join(self._image_dir(fstype), f"{TAG}-{fstype}-{self._serial}.img")
        with open(image, "wb") as f:
            f.truncate(IMAGE_SIZE)
        loop = loopdev.LoopDevice(image).attach()
        log.info("attached %s", loop)
        return loop

    def format(self, fstype, device, mkfs_options=()):
        cmd = MKFS[fstype] + list(mkfs_options) + ["-L", TAG, device]
        log.info("mkfs: %s", " ".join(cmd))
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")

    @contextlib.contextmanager
    def underlay(self, fstype, options="", mkfs_options=(), name="underlay", fault_backend=None):
        """A freshly made fstype mounted at <pool>/<name>; all undone on exit.
        With fault_backend, it lies on that backend's faulty device."""
        root = os.path.join(self.directory, name)
        os.makedirs(root, exist_ok=True)
        loop = faulty = None
        try:
            if fault_backend is not None:
                self._serial += 1
                image = os.path.join(self._image_dir(fstype), f"{TAG}-faulty-{self._serial}.img")
                with open(image, "wb") as f:
                    f.truncate(IMAGE_SIZE)
                faulty = fault_backend(image, os.path.join(self.directory, f"faulty-{self._serial}"))
                log.info("faulty device: %s", faulty.describe())
                self.format(fstype, faulty.path, mkfs_options)
                # errors=continue: a failed data write must not end the filesystem
                options = ",".join(filter(None, [options, "errors=continue" if fstype == "ext4" else ""]))
                syscalls.mount(faulty.path, root, fstype, 0, options or None)
            elif fstype == "tmpfs":
                syscalls.mount(f"{TAG}-tmpfs", root, "tmpfs", 0,
                               ",".join(filter(None, ["size=512m", options])))
            else:
                loop = self._new_device(fstype)
                self.format(fstype, loop.path, mkfs_options)
                syscalls.mount(loop.path, root, fstype, 0, options or None)
            device = faulty.path if faulty else loop.path if loop else None
            under = Underlay(fstype, root, device, options, faulty)
            log.info("underlay: %s", under.describe())
            try:
                yield under
            finally:
                mounts.unmount(root)
                log.info("underlay unmounted: %s", root)
        finally:
            if loop is not None:
                loop.detach()  # autoclear finishes it if a dying namespace still holds the fs
                os.unlink(loop.image)
            if faulty is not None:
                faulty.destroy()
                os.unlink(faulty.image)

    def close(self):
        if self._images_mounted:
            mounts.unmount(self.images)  # lazily if a dying namespace still holds an image
            self._images_mounted = False
        shutil.rmtree(self.directory, ignore_errors=True)
