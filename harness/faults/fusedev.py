"""The bundled faulty block device, for kernels without device-mapper.

A single-file FUSE filesystem (harness/faultyfs.py) serves the image and
answers EIO for the failing ranges; a loop device goes over its file.  Writes
in a failing range come back to the filesystem on the loop device as real
block I/O errors, so fsync and syncfs see EIO through the normal kernel path
(tried on kernels without device-mapper).  Teardown: loop device, then the daemon.
"""

import os

from harness import loopdev
from harness.faults import register
from harness.fusedaemon import FuseDaemon, python_module


@register
class FuseDev:
    name = "fusedev"
    preference = 2  # device-mapper's error target first, where the kernel has it

    @staticmethod
    def unavailable(probe):
        for feature in ("fuse", "pyfuse3", "loop"):
            if not probe.feature(feature):
                return probe.reason(feature)
        return None

    def __init__(self, image, workdir):
        self.image = image
        self.workdir = workdir
        self.mountdir = os.path.join(workdir, "faultydev")
        os.makedirs(self.mountdir, exist_ok=True)
        self.daemon = FuseDaemon(python_module("harness.faultyfs", image, self.mountdir), self.mountdir,
                                 workdir, "faultydev")
        self.daemon.start()
        try:
            self.loop = loopdev.LoopDevice(os.path.join(self.mountdir, "disk")).attach()
        except BaseException:
            self.daemon.stop()
            raise
        self.path = self.loop.path

    def _control(self, text):
        with open(os.path.join(self.mountdir, "control"), "w") as f:
            f.write(text)

    def fail(self, ranges):
        self._control("".join(f"fail {start} {length}\n" for start, length in ranges))

    def drop_writes(self, ranges):
        self._control("".join(f"drop {start} {length}\n" for start, length in ranges))

    def fail_all(self):
        self._control("fail all\n")

    def heal(self):
        self._control("heal\n")

    def describe(self):
        return f"fusedev: {self.path} over {self.image} (EIO for chosen byte ranges)"

    def destroy(self):
        self.loop.detach()
        problem = self.daemon.stop()
        if problem:
            raise RuntimeError(problem)
