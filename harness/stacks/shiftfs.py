"""Ubuntu's shiftfs: a marked source, then a shifted mount made inside the container.

As LXD uses it: `mount -t shiftfs -o mark SRC SRC` in the host's namespaces,
then `mount -t shiftfs SRC MNT` from the container's user and mount namespace.
The shifted mount exists only there; host processes reach it through the
holder's /proc/<pid>/root, container processes by joining its namespaces.
"""

import logging
import os

from harness import container, mounts, syscalls
from harness.stacks import register
from harness.stacks.base import ShiftingStack

log = logging.getLogger("stackcheck.stack")


def _mount_shifted(source, target):
    syscalls.mount(source, target, "shiftfs", 0, None)


@register
class Shiftfs(ShiftingStack):
    kind = "shiftfs"
    variants = {"shiftfs": {}}
    holder = None

    @classmethod
    def features(cls, variant):
        return ("userns", "shiftfs")

    def mount(self):
        self._make_dirs()
        syscalls.mount(self.source, self.source, "shiftfs", 0, "mark")
        try:
            self.holder = container.Holder(self.user_map, _mount_shifted, self.source, self.mountpoint)
        except BaseException:
            mounts.unmount(self.source)
            raise
        log.info("shiftfs: marked %s, shifted mount at %s in container %d",
                 self.source, self.mountpoint, self.holder.pid)
        self.mounted = True

    def superblock_path(self):
        return self.source  # the mark; the shifted mount goes with the holder's namespace

    def _unmount(self):
        self.holder.stop()  # the shifted mount goes with the container's mount namespace
        mounts.unmount(self.source)

    def path(self, *rel):
        if self.holder is None:
            return super().path(*rel)
        return os.path.join(f"/proc/{self.holder.pid}/root{self.mountpoint}", *rel)

    def start(self, fn, *args, beside=None):
        # Every process of this stack's user lives in the holder's container.
        return container.start(fn, *args, idmap=self.user_map, join=self.holder.pid)
