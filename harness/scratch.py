"""Scratch underlays: ext4, xfs and btrfs on loop devices, and tmpfs.

A pool belongs to one worker.  It keeps one sparse image and one loop device
per block filesystem for its whole life and formats it again for every case
(mkfs of a 512 MiB sparse image costs milliseconds), so each case starts on a
fresh filesystem without the cost of new devices.
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

    def __init__(self, fstype, root, device=None, options=""):
        self.fstype = fstype
        self.root = root
        self.device = device
        self.options = options

    def path(self, *parts):
        return os.path.join(self.root, *parts)

    def describe(self):
        where = f" on {self.device}" if self.device else ""
        return f"{self.fstype}{where} at {self.root} (options: {self.options or 'defaults'})"


class ScratchPool:
    def __init__(self, directory):
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        self._loops = {}

    def _device(self, fstype):
        if fstype not in self._loops:
            image = os.path.join(self.directory, f"{TAG}-{fstype}.img")
            with open(image, "wb") as f:
                f.truncate(IMAGE_SIZE)
            self._loops[fstype] = loopdev.LoopDevice(image).attach()
            log.info("attached %s", self._loops[fstype])
        return self._loops[fstype].path

    def format(self, fstype, device, mkfs_options=()):
        cmd = MKFS[fstype] + list(mkfs_options) + ["-L", TAG, device]
        log.info("mkfs: %s", " ".join(cmd))
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")

    @contextlib.contextmanager
    def underlay(self, fstype, options="", mkfs_options=(), name="underlay"):
        """A freshly made fstype mounted at <pool>/<name>; unmounted on exit."""
        root = os.path.join(self.directory, name)
        os.makedirs(root, exist_ok=True)
        if fstype == "tmpfs":
            device = None
            syscalls.mount(f"{TAG}-tmpfs", root, "tmpfs", 0, ",".join(filter(None, ["size=512m", options])))
        else:
            device = self._device(fstype)
            self.format(fstype, device, mkfs_options)
            syscalls.mount(device, root, fstype, 0, options or None)
        under = Underlay(fstype, root, device, options)
        log.info("underlay: %s", under.describe())
        try:
            yield under
        finally:
            mounts.unmount(root)
            log.info("underlay unmounted: %s", root)

    def close(self):
        """Detach the pool's loop devices and remove its images."""
        while self._loops:
            _, loop = self._loops.popitem()
            loop.detach()
            os.unlink(loop.image)
        shutil.rmtree(self.directory, ignore_errors=True)
