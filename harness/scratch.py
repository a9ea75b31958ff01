"""Scratch underlays: ext4, xfs and btrfs on loop devices, tmpfs, and ext4 on
a zram device of our own (ext4-zram).

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
import errno
import logging
import os
import shutil
import subprocess

from harness import loopdev, mounts, syscalls, zram
from harness.rundir import TAG

log = logging.getLogger("stackcheck.scratch")

IMAGE_SIZE = 512 << 20
# Sparse images use memory only for what is written.
IMAGES_TMPFS_SIZE = "8g"
IMAGES_ON_DISK = ("xfs", "xfs-log")
MKFS = {
    "ext4": ["mkfs.ext4", "-q", "-F", "-E", "nodiscard,lazy_itable_init=1,lazy_journal_init=1"],
    "xfs": ["mkfs.xfs", "-q", "-f", "-K"],
    "btrfs": ["mkfs.btrfs", "-q", "-f", "-K"],
}
UNDERLAY_FILESYSTEMS = ("ext4", "xfs", "btrfs", "tmpfs")
# Underlays on another kind of device than a loop: name -> the filesystem on it.
ON_ZRAM = {"ext4-zram": "ext4"}
UNDERLAYS = UNDERLAY_FILESYSTEMS + tuple(ON_ZRAM)


def filesystem_of(underlay):
    return ON_ZRAM.get(underlay, underlay)


def unavailable(underlay, probe):
    """Why this machine cannot build this underlay, or None."""
    fstype = filesystem_of(underlay)
    if underlay in ON_ZRAM and not probe.feature("zram"):
        return probe.reason("zram")
    if fstype not in probe.filesystems:
        return f"kernel has no {fstype} (not in /proc/filesystems)"
    if fstype in MKFS:
        if not probe.tools.get(MKFS[fstype][0]):
            return f"{MKFS[fstype][0]} not found on PATH"
        if underlay not in ON_ZRAM and not probe.feature("loop"):
            return probe.reason("loop")
    return None


class Underlay:
    """A mounted scratch filesystem."""

    def __init__(self, fstype, root, device=None, options="", faulty=None, layout=""):
        self.fstype = fstype
        self.root = root
        self.device = device
        self.options = options
        self.faulty = faulty  # the fault backend's device, for the eio cases
        self.layout = layout  # where the journal or log lives, when it matters

    def path(self, *parts):
        return os.path.join(self.root, *parts)

    def mount(self):
        if self.device is None:
            syscalls.mount(f"{TAG}-tmpfs", self.root, "tmpfs", 0, ",".join(filter(None, ["size=512m", self.options])))
        else:
            syscalls.mount(self.device, self.root, self.fstype, 0, self.options or None)

    def remount(self):
        """Unmount and mount again, so what is read next comes from the device."""
        if self.device is None:
            raise ValueError("a tmpfs underlay cannot be mounted again: its contents live in memory only")
        # Mounting the device again while its filesystem lives would give back that
        # same superblock, caches and all.
        with mounts.superblock_gone(self.root, self.describe()):
            mounts.unmount(self.root)
        self.mount()
        log.info("underlay mounted again: %s", self.describe())

    def describe(self):
        where = f" on {self.device}" if self.device else ""
        layout = f"; {self.layout}" if self.layout else ""
        return f"{self.fstype}{where} at {self.root} (options: {self.options or 'defaults'}{layout})"


class ScratchPool:
    def __init__(self, directory):
        self.directory = directory
        self.images = os.path.join(directory, "images")
        os.makedirs(self.images, exist_ok=True)
        self._images_mounted = False
        self._serial = 0
        self._held = []  # zram devices still busy when their underlay was released

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
    def underlay(self, kind, options="", mkfs_options=(), name="underlay", fault_backend=None):
        """A freshly made underlay of this kind (UNDERLAYS) mounted at <pool>/<name>;
        all undone on exit.  With fault_backend, it lies on that backend's faulty device."""
        fstype = filesystem_of(kind)
        root = os.path.join(self.directory, name)
        os.makedirs(root, exist_ok=True)
        devices = []  # undone in reverse order
        try:
            device, faulty, layout = None, None, ""
            if fault_backend is not None:
                faulty = self._faulty_device(fault_backend, fstype)
                devices.append(faulty)
                device = faulty.path
                options, mkfs_options, layout = self._fault_layout(fstype, options, mkfs_options, devices)
            elif kind in ON_ZRAM:
                devices.append(zram.ZramDevice(self.directory).create(IMAGE_SIZE))
                device = devices[-1].path
                layout = f"zram, {devices[-1].algorithm()} compression"
            elif fstype != "tmpfs":
                devices.append(self._new_device(fstype))
                device = devices[-1].path
            if device is not None:
                self.format(fstype, device, mkfs_options)
            under = Underlay(fstype, root, device, options, faulty, layout)
            under.mount()
            log.info("underlay: %s", under.describe())
            try:
                yield under
            finally:
                mounts.unmount(root)
                log.info("underlay unmounted: %s", root)
        finally:
            for dev in reversed(devices):
                self._release(dev)

    def _fault_layout(self, fstype, options, mkfs_options, devices):
        """Keep error reporting meaningful when only data blocks fail, as
        generic/441 does: ext4 carries on after an I/O error (errors=continue),
        xfs keeps its log on a second, healthy device."""
        if fstype == "ext4":
            return (",".join(filter(None, [options, "errors=continue"])), mkfs_options,
                    "journal inside the faulty device; only file data blocks are failed, errors=continue")
        if fstype == "xfs":
            logdev = self._new_device("xfs-log")
            devices.append(logdev)
            return (",".join(filter(None, [options, f"logdev={logdev.path}"])),
                    [*mkfs_options, "-l", f"logdev={logdev.path},size=64m"],
                    f"log on a separate healthy device {logdev.path}")
        return options, mkfs_options, ""

    def _faulty_device(self, backend, fstype):
        self._serial += 1
        image = os.path.join(self._image_dir(fstype), f"{TAG}-faulty-{self._serial}.img")
        with open(image, "wb") as f:
            f.truncate(IMAGE_SIZE)
        faulty = backend(image, os.path.join(self.directory, f"faulty-{self._serial}"))
        log.info("faulty device: %s", faulty.describe())
        return faulty

    def _release(self, device):
        if isinstance(device, zram.ZramDevice):
            try:
                device.destroy()
            except OSError as e:
                if e.errno != errno.EBUSY:
                    raise
                # A dying mount namespace still holds the filesystem: try again at close.
                log.info("%s still held after unmount; removed at the pool's close", device)
                self._held.append(device)
            return
        if isinstance(device, loopdev.LoopDevice):
            device.detach()  # autoclear finishes it if a dying namespace still holds the fs
        else:
            device.destroy()
        os.unlink(device.image)

    def close(self):
        for device in self._held:
            device.destroy()
        self._held = []
        if self._images_mounted:
            mounts.unmount(self.images)  # lazily if a dying namespace still holds an image
            self._images_mounted = False
        shutil.rmtree(self.directory, ignore_errors=True)
