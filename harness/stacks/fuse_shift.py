"""stackfs in shift mode: stackcheck's own FUSE shifting filesystem (harness/stackfs).

Stack option bug=NAME[,NAME] starts it with bug switches (harness/stackfs/bugs.py).
"""

import logging

from harness.fusedaemon import FuseDaemon, python_module
from harness.rundir import TAG
from harness.stacks import register
from harness.stacks.base import ShiftingStack

log = logging.getLogger("stackcheck.stack")


@register
class FuseShift(ShiftingStack):
    kind = "fuse"
    variants = {"fuse-shift": {}}
    daemon = None

    @classmethod
    def features(cls, variant):
        return ("fuse", "userns", "pyfuse3")

    def mount(self):
        self._make_dirs()
        bugs = [b for b in self.options.get("bug", "").split(",") if b]
        m = self.user_map
        argv = python_module("harness.stackfs", "shift", self.source, self.mountpoint,
                             "--map", f"{m.inside}:{m.outside}:{m.count}", "--fsname", f"{TAG}-fuse-shift",
                             *[arg for bug in bugs for arg in ("--bug", bug)])
        log.info("stackfs: %s", " ".join(argv))
        self.daemon = FuseDaemon(argv, self.mountpoint, self.workdir, "stackfs")
        self.daemon.start()
        self.mounted = True

    def _unmount(self):
        problem = self.daemon.stop()
        if problem:
            raise RuntimeError(problem)
