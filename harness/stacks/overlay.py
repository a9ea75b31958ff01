"""Kernel overlayfs (Documentation/filesystems/overlayfs.rst): lower, upper, work."""

import logging
import os
import shutil

from harness import syscalls
from harness.rundir import TAG
from harness.stacks import register
from harness.stacks.base import LayeredStack

log = logging.getLogger("stackcheck.stack")


@register
class Overlay(LayeredStack):
    kind = "overlay"
    underlay_changes_undefined = (
        "overlayfs leaves changes to its layers while mounted undefined "
        "(Documentation/filesystems/overlayfs.rst, Changes to underlying filesystems)")
    variants = {
        "overlay": {"options": "", "features": ()},
        # "volatile": sync calls skip the upper filesystem by design (overlayfs.rst, Volatile mount)
        "overlay_volatile": {"options": "volatile", "features": ("overlay.volatile@{fs}",),
                             "traits": ("volatile",)},
        "overlay_metacopy": {"options": "metacopy=on,redirect_dir=on,index=on",
                             "features": ("overlay.metacopy@{fs}",)},
    }

    @classmethod
    def features(cls, variant):
        return ("overlay@{fs}",) + cls.variants[variant]["features"]

    def remount(self):
        self.unmount()
        # A volatile overlay marks its workdir dirty until this is removed (overlayfs.rst, Volatile mount).
        shutil.rmtree(os.path.join(self.work, "work", "incompat", "volatile"), ignore_errors=True)
        self.mount()

    def mount(self):
        self._make_dirs()
        options = f"lowerdir={self.lower},upperdir={self.upper},workdir={self.work}"
        if self.settings["options"]:
            options += "," + self.settings["options"]
        log.info("mount -t overlay -o %s %s %s", options, TAG, self.mountpoint)
        syscalls.mount(TAG, self.mountpoint, "overlay", 0, options)
        self.mounted = True
