"""Helpers for stackcheck's own tests: run ./check as a user would, in scratch."""

import glob
import os
import shutil
import subprocess
import tempfile

import psutil
import pytest

from harness import dmdev, rundir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECK = os.path.join(ROOT, "check")
SELFTEST_CASES = os.path.join(ROOT, "tests", "selftest_cases")

collect_ignore = ["selftest_cases"]  # cases for ./check --case-dir, not tests

# Real shiftfs is test material beside the clone, not part of it: the tests that need it
# skip without it, and the closing lines say how many and where it was looked for.
SHIFTFS = os.path.realpath(os.path.join(ROOT, "..", "shared", "shiftfs"))
NO_SHIFTFS = f"no shiftfs source at {SHIFTFS}"
needs_shiftfs = pytest.mark.skipif(not os.path.isfile(os.path.join(SHIFTFS, "dkms.conf")), reason=NO_SHIFTFS)

# A test that runs ./check (or QEMU) waits on its subprocesses' own limits: pytest's
# limit for it is derived from theirs, so that a loaded machine never cuts a run short
# and leaves its mounts or QEMU behind.  MARGIN is the test's own work around them.
MARGIN = 60
CHECK_LIMIT = 240  # a ./check run of a few cases: within pytest.ini's limit with the margin


def waits_for(*subprocess_limits):
    """The pytest limit of a test whose subprocesses have these limits, one after another."""
    return pytest.mark.timeout(sum(subprocess_limits) + MARGIN)


def time_limit(item):
    marker = item.get_closest_marker("timeout")
    return marker.args[0] if marker and marker.args else float(item.config.getini("timeout"))


def pytest_terminal_summary(terminalreporter):
    for line in LEFT_BEHIND:
        terminalreporter.write_line(f"LEFT BEHIND by {line}", red=True)
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if NO_SHIFTFS in str(r.longrepr)]
    if skipped:
        terminalreporter.write_line(f"{len(skipped)} skipped: {NO_SHIFTFS}; these tests run real shiftfs, "
                                    f"given to ./check as --module {SHIFTFS}")


class LimitError(AssertionError):
    """A test gives its subprocesses more time than pytest gives the test."""


class CheckRunner:
    def __init__(self, tmp_path, run_base, limit=None):
        self.results = str(tmp_path / "results")
        self.run_base = run_base
        self.limit = limit  # pytest's limit for the test, None: not checked
        self.waited = 0  # the subprocess limits given so far
        self.env = dict(os.environ, STACKCHECK_RUN_BASE=self.run_base)
        self.env.pop("CI", None)

    def command(self, *args, selftest=False):
        extra = ["--case-dir", SELFTEST_CASES] if selftest else []
        return [CHECK, "--results", self.results, *extra, *args]

    def within_limit(self, timeout):
        """Refuse a subprocess limit that pytest's limit for the test would cut short."""
        self.waited += timeout
        if self.limit is not None and self.waited + MARGIN > self.limit:
            raise LimitError(f"this test gives its ./check runs {self.waited} s in all, but pytest stops it at "
                             f"{self.limit:.0f} s: declare @waits_for(...) with those limits")

    def __call__(self, *args, selftest=False, timeout=CHECK_LIMIT, **kwargs):
        self.within_limit(timeout)
        return subprocess.run(self.command(*args, selftest=selftest), env=self.env, capture_output=True,
                              text=True, timeout=timeout, **kwargs)

    def start(self, *args, selftest=False, **kwargs):
        return subprocess.Popen(self.command(*args, selftest=selftest), env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, **kwargs)

    def section_dir(self):
        (section,) = os.listdir(self.results)
        return os.path.join(self.results, section)


LEFT_BEHIND = []  # what a test's runs left in its run base: the self-test fails with it listed


@pytest.fixture
def run_base(request):
    """A run-directory base that container users can reach (pytest's tmp_path is 0700).
    Whatever the test's runs left there is a harness bug: it is listed at the end of the
    self-test and fails it, then removed (a run the test killed on purpose is cleaned up
    by the test itself, as the next run would)."""
    path = tempfile.mkdtemp(prefix="stackcheck-test-runs-")
    os.chmod(path, 0o755)
    yield path
    run_ids = [name for name in os.listdir(path) if name.startswith("run-")]
    left = leftovers(path, run_ids)
    if left:
        LEFT_BEHIND.append(f"{request.node.nodeid}: {'; '.join(left)}")
        for run_id in run_ids:
            rundir.RunDir(os.path.join(path, run_id)).remove()
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def check(request, tmp_path, run_base):
    """Runs ./check with results and run directories in this test's scratch."""
    return CheckRunner(tmp_path, run_base, time_limit(request.node))


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


def leftovers(run_base, run_ids):
    """Everything tagged stackcheck that runs under run_base left: mounts, loop, zram and
    dm devices, processes, each said as 'kind name'."""
    found = [f"{kind} {name}" for kind, names in harness_traces(run_base).items() for name in names]
    found += [f"dm {name}" for name in dmdev.names() if any(f"{rundir.TAG}-{run_id}-" in name for run_id in run_ids)]
    found += [f"process {p.pid} ({' '.join(p.info['cmdline'])[:120]})"
              for p in psutil.process_iter(["cmdline"]) if run_base in " ".join(p.info["cmdline"] or [])]
    return found


def pytest_sessionfinish(session):
    if LEFT_BEHIND:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def fake_probe(**features):
    """A Probe of an imaginary machine: features given as name=present."""
    from harness.probe import Probe
    probe = Probe("6.1.0-test", ["ext4", "tmpfs", "overlay"],
                  tools={"mkfs.ext4": "/sbin/mkfs.ext4", "emacs": None})
    probe.set("loop", True)
    for name, ok in features.items():
        probe.set(name, ok, "" if ok else f"{name} is missing here")
    return probe
