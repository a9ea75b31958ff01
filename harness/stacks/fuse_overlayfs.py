"""fuse-overlayfs (https://github.com/containers/fuse-overlayfs): overlayfs in user
space, as rootless Podman mounts container layers: lowerdir, upperdir, workdir;
-o dev so that the device-node cases mean something."""

from harness.stacks import register
from harness.stacks.base import LayeredStack
from harness.stacks.command import CommandStack


@register
class FuseOverlayfs(CommandStack, LayeredStack):
    variants = {"fuse-overlayfs": {}}
    template = "fuse-overlayfs -f -o dev,lowerdir={lower},upperdir={upper},workdir={work} {mountpoint}"
    underlay_changes_undefined = (
        "fuse-overlayfs implements overlayfs, which leaves changes to its layers while mounted undefined "
        "(Documentation/filesystems/overlayfs.rst); its maintainer: \"the assumption done by overlay is that "
        "the lower layers are not modified\" (https://github.com/containers/fuse-overlayfs/issues/275)")
