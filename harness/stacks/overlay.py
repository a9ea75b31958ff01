"""Kernel overlayfs (Documentation/filesystems/overlayfs.rst): lower, upper, work."""

import logging
import os

from harness import syscalls
from harness.rundir import TAG
from harness.stacks import register
from harness.stacks.base import Stack

log = logging.getLogger("stackcheck.stack")


@register
class Overlay(Stack):
    kind = "overlay"
    traits = frozenset({"union"})
    underlay_changes_undefined = (
        "overlayfs leaves changes to its layers while mounted undefined "
        "(Documentation/filesystems/overlayfs.rst, Changes to underlying filesystems)")
    variants = {
        "overlay": {"options": "", "features": ()},
        "overlay_volatile": {"options": "volatile", "features": ("overlay.volatile@{fs}",)},
        "overlay_metacopy": {"options": "metacopy=on,redirect_dir=on,index=on",
                             "features": ("overlay.metacopy@{fs}",)},
    }

    @classmethod
    def features(cls, variant):
        return ("overlay@{fs}",) + cls.variants[variant]["features"]

    def __init__(self, variant, underlay, workdir, options=None):
        super().__init__(variant, underlay, workdir, options)
        self.lower, self.upper, self.work = (underlay.path(d) for d in ("lower", "upper", "work"))

    def mount(self):
        for d in (self.lower, self.upper, self.work, self.mountpoint):
            os.makedirs(d, exist_ok=True)
        options = f"lowerdir={self.lower},upperdir={self.upper},workdir={self.work}"
        if self.settings["options"]:
            options += "," + self.settings["options"]
        log.info("mount -t overlay -o %s %s %s", options, TAG, self.mountpoint)
        syscalls.mount(TAG, self.mountpoint, "overlay", 0, options)
        self.mounted = True

    def host_path(self, *rel):
        # Host-side edits go to the lower layer: the scenario's "underlay" for a
        # union, and the layer overlayfs says must not change while mounted.
        return os.path.join(self.lower, *rel)

    def on_underlay(self, *rel):
        upper = os.path.join(self.upper, *rel)
        return upper if os.path.lexists(upper) else os.path.join(self.lower, *rel)
