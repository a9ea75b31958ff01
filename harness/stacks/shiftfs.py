"""Ubuntu's shiftfs: a marked source, then a shifted mount made inside the container.

`mount -t shiftfs -o mark SRC MARK` in the host's namespaces, then `mount -t
shiftfs MARK MNT` from the container's user and mount namespace, as Ubuntu's
containers did.  The mark has a directory of its own (LXD marks a rootfs in
place): host processes then edit the underlay itself, which is what the
scenarios mean by "on the underlay" (a mark is a shiftfs superblock too, and
refuses mknod of devices).  The shifted mount exists only in the container;
host processes reach it through the holder's /proc/<pid>/root, container
processes by joining its namespaces.
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
        mark = os.path.join(self.workdir, "mark")
        os.makedirs(mark, exist_ok=True)
        syscalls.mount(self.source, mark, "shiftfs", 0, "mark")
        try:
            self.holder = container.Holder(self.user_map, _mount_shifted, mark, self.mountpoint)
        except BaseException:
            mounts.unmount(mark)
            raise
        log.info("shiftfs: %s marked at %s, shifted mount at %s in container %d",
                 self.source, mark, self.mountpoint, self.holder.pid)
        self.mounted = True

    def superblock_path(self):
        return os.path.join(self.workdir, "mark")  # the shifted mount goes with the holder's namespace

    def _unmount(self):
        self.holder.stop()  # the shifted mount goes with the container's mount namespace
        mounts.unmount(os.path.join(self.workdir, "mark"))

    def path(self, *rel):
        if self.holder is None:
            return super().path(*rel)
        return os.path.join(f"/proc/{self.holder.pid}/root{self.mountpoint}", *rel)

    def start(self, fn, *args, beside=None):
        # Every process of this stack's user lives in the holder's container.
        return container.start(fn, *args, idmap=self.user_map, join=self.holder.pid)
