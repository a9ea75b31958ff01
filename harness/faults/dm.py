"""device-mapper's error target, as xfstests' common/dmerror uses it.

A linear table over a loop device; fail(ranges) loads a table whose failing
sector ranges are `error` segments (dmsetup suspend --nolockfs, load, resume),
drop_writes(ranges) makes them dm-flakey segments that drop writes (always
down, as xfstests' common/dmflakey does), heal() loads the linear table again.  Names carry the stackcheck prefix and are
always removed on teardown.  Works without udev (DM_DISABLE_UDEV=1, --noudevsync).
"""

import os
import subprocess

from harness import loopdev
from harness.dmdev import DMSETUP_ENV
from harness.faults import register
from harness.rundir import TAG

SECTOR = 512


@register
class DmError:
    name = "dm"
    preference = 1

    @staticmethod
    def unavailable(probe):
        for feature in ("device-mapper", "dm-error", "dm-linear", "loop"):
            if not probe.feature(feature):
                return probe.reason(feature)
        if not probe.tools.get("dmsetup"):
            return "dmsetup not found on PATH"
        return None

    def __init__(self, image, workdir):
        self.image = image
        self.loop = loopdev.LoopDevice(image).attach()
        self.sectors = os.path.getsize(image) // SECTOR
        self.name = self._name_for(workdir)
        try:
            self._dmsetup("create", self.name, "--table", self._table([]))
        except BaseException:
            self.loop.detach()
            raise
        self.path = f"/dev/mapper/{self.name}"

    @staticmethod
    def _name_for(workdir):
        """stackcheck-<run id>-<worker>-<device>: RunDir.dm_prefix finds a dead run's."""
        parts = os.path.realpath(workdir).split(os.sep)
        runs = [i for i, part in enumerate(parts) if part.startswith("run-")]
        if not runs:
            return f"{TAG}-{os.getpid()}-{parts[-1]}"
        i = runs[-1]
        return "-".join([TAG, parts[i], *parts[i + 1:i + 2], parts[-1]])

    def _dmsetup(self, *args):
        done = subprocess.run(["dmsetup", *args[:1], "--noudevsync", *args[1:]], env=DMSETUP_ENV,
                              capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"dmsetup {' '.join(args)}: {done.stderr.strip()}")

    def _table(self, ranges, target=lambda first: "error"):
        """Linear everywhere but the chosen sector ranges, which get `target`."""
        bad = sorted((start // SECTOR, -(-(start + length) // SECTOR)) for start, length in ranges)
        lines, at = [], 0
        for first, end in bad:
            first, end = max(first, at), min(end, self.sectors)
            if first > at:
                lines.append(f"{at} {first - at} linear {self.loop.path} {at}")
            if end > first:
                lines.append(f"{first} {end - first} {target(first)}")
            at = max(at, end)
        if at < self.sectors:
            lines.append(f"{at} {self.sectors - at} linear {self.loop.path} {at}")
        return "\n".join(lines)

    def _swap(self, table):
        self._dmsetup("suspend", "--nolockfs", self.name)
        try:
            self._dmsetup("load", self.name, "--table", table)
        finally:
            self._dmsetup("resume", self.name)

    def fail(self, ranges):
        self._swap(self._table(ranges))

    def drop_writes(self, ranges):
        # flakey <dev> <offset> <up 0 s> <down 180 s> 1 drop_writes: always down, writes vanish
        self._swap(self._table(ranges, lambda first: f"flakey {self.loop.path} {first} 0 180 1 drop_writes"))

    def fail_all(self):
        self._swap(f"0 {self.sectors} error")

    def heal(self):
        self._swap(self._table([]))

    def describe(self):
        return f"dm: {self.path} (linear over {self.loop.path}; error segments for chosen sectors)"

    def destroy(self):
        try:
            self._dmsetup("remove", "--retry", self.name)
        finally:
            self.loop.detach()
