"""stackfs in shift mode: stackcheck's own FUSE shifting filesystem (harness/stackfs).

Stack option bug=NAME[,NAME] starts it with bug switches (harness/stackfs/bugs.py).
"""

from harness.fusedaemon import python_module
from harness.rundir import TAG
from harness.stacks import register
from harness.stacks.base import DaemonStack, ShiftingStack


@register
class FuseShift(DaemonStack, ShiftingStack):
    kind = "fuse"
    variants = {"fuse-shift": {}}

    @classmethod
    def features(cls, variant):
        return ("fuse", "userns", "pyfuse3")

    def daemon_argv(self):
        m = self.user_map
        return python_module("harness.stackfs", "shift", self.source, self.mountpoint,
                             "--map", f"{m.inside}:{m.outside}:{m.count}", "--fsname", f"{TAG}-fuse-shift",
                             *self.bug_arguments())
