"""Helpers for stackcheck's own tests: run ./check as a user would, in scratch."""

import glob
import os
import shutil
import subprocess
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECK = os.path.join(ROOT, "check")
SELFTEST_CASES = os.path.join(ROOT, "tests", "selftest_cases")

collect_ignore = ["selftest_cases"]  # cases for ./check --case-dir, not tests


class CheckRunner:
    def __init__(self, tmp_path, run_base):
        self.results = str(tmp_path / "results")
        self.run_base = run_base
        self.env = dict(os.environ, STACKCHECK_RUN_BASE=self.run_base)
        self.env.pop("CI", None)

    def command(self, *args, selftest=False):
        extra = ["--case-dir", SELFTEST_CASES] if selftest else []
        return [CHECK, "--results", self.results, *extra, *args]

    def __call__(self, *args, selftest=False, timeout=600, **kwargs):
        return subprocess.run(self.command(*args, selftest=selftest), env=self.env, capture_output=True,
                              text=True, timeout=timeout, **kwargs)

    def start(self, *args, selftest=False, **kwargs):
        return subprocess.Popen(self.command(*args, selftest=selftest), env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, **kwargs)

    def section_dir(self):
        (section,) = os.listdir(self.results)
        return os.path.join(self.results, section)


@pytest.fixture
def run_base():
    """A run-directory base that container users can reach (pytest's tmp_path is 0700)."""
    path = tempfile.mkdtemp(prefix="stackcheck-test-runs-")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def check(tmp_path, run_base):
    """Runs ./check with results and run directories in this test's scratch."""
    return CheckRunner(tmp_path, run_base)


NO_TRACES = {"mounts": [], "loops": [], "zram": []}


def harness_traces(run_base):
    """Mounts, loop devices and zram devices that belong to runs under run_base."""
    with open("/proc/self/mountinfo") as f:
        mounts = sorted(line.split()[4] for line in f if run_base in line)
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    loops = sorted(line for line in loops.splitlines() if run_base in line)
    records = glob.glob(os.path.join(glob.escape(run_base), "**", "zram.*"), recursive=True)
    zram = sorted(f"zram{r.rsplit('.', 1)[1]}" for r in records
                  if os.path.exists(f"/sys/block/zram{r.rsplit('.', 1)[1]}"))
    return {"mounts": mounts, "loops": loops, "zram": zram}


def fake_probe(**features):
    """A Probe of an imaginary machine: features given as name=present."""
    from harness.probe import Probe
    probe = Probe("6.1.0-test", ["ext4", "tmpfs", "overlay"],
                  tools={"mkfs.ext4": "/sbin/mkfs.ext4", "emacs": None})
    probe.set("loop", True)
    for name, ok in features.items():
        probe.set(name, ok, "" if ok else f"{name} is missing here")
    return probe
