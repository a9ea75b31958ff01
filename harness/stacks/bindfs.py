"""bindfs (https://bindfs.org): a FUSE mirror of a directory, here shifting ids for
the container as the other shifted stacks do (--uid-offset/--gid-offset, bindfs
1.14+); -o dev so that the device-node cases mean something."""

from harness.stacks import register
from harness.stacks.base import ShiftingStack
from harness.stacks.command import CommandStack


@register
class Bindfs(CommandStack, ShiftingStack):
    variants = {"bindfs": {}}
    template = ("bindfs -f -o dev,fsname={fsname} --uid-offset={uid_offset} --gid-offset={gid_offset} "
                "{source} {mountpoint}")
