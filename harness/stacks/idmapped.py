"""Idmapped mounts, the upstream successor of shiftfs (Documentation/filesystems/idmappings.rst).

A bind mount of the underlay's source directory made with open_tree(2),
given the container's user namespace with mount_setattr(MOUNT_ATTR_IDMAP) and
attached with move_mount(2).  On-disk id N shows as host id 100000+N, which
the container sees as N.
"""

import logging
import os

from harness import container, syscalls
from harness.stacks import register
from harness.stacks.base import ShiftingStack

log = logging.getLogger("stackcheck.stack")
_userns_fds = {}  # IdMap -> fd: one user namespace per process serves every mount


def _userns(idmap):
    if idmap not in _userns_fds:
        _userns_fds[idmap] = container.userns_fd(idmap)
    return _userns_fds[idmap]


@register
class Idmapped(ShiftingStack):
    kind = "idmapped"
    variants = {"idmapped": {}}

    @classmethod
    def features(cls, variant):
        return ("userns", "idmapped@{fs}")

    def mount(self):
        self._make_dirs()
        tree = syscalls.open_tree(self.source, syscalls.OPEN_TREE_CLONE | syscalls.OPEN_TREE_CLOEXEC)
        try:
            syscalls.mount_setattr_idmap(tree, _userns(self.user_map))
            syscalls.move_mount(tree, self.mountpoint)
        finally:
            os.close(tree)
        log.info("idmapped mount of %s at %s, map %s", self.source, self.mountpoint, self.user_map.line().strip())
        self.mounted = True

    def superblock_path(self):
        return None  # a view of the underlay's own superblock, which outlives it
