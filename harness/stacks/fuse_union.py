"""stackfs in union mode: stackcheck's own FUSE union (overlayfs' on-disk format).

Unlike kernel overlayfs, it defines what a change to its lower layer does: every
lookup asks the layers again, so the change shows at once (until the object is
copied up).  Stack option bug=NAME[,NAME] starts it with bug switches.
"""

from harness.fusedaemon import python_module
from harness.rundir import TAG
from harness.stacks import register
from harness.stacks.base import DaemonStack, LayeredStack


@register
class FuseUnion(DaemonStack, LayeredStack):
    kind = "fuse"
    variants = {"fuse-union": {}}

    @classmethod
    def features(cls, variant):
        return ("fuse", "pyfuse3")

    def daemon_argv(self):
        return python_module("harness.stackfs", "union", self.lower, self.upper, self.mountpoint,
                             "--fsname", f"{TAG}-fuse-union", *self.bug_arguments())
