"""Nothing of the harness is left behind: after a pass, a failure, SIGINT,
SIGTERM, and a SIGKILL followed by a fresh run (which cleans up after it)."""

import os
import select
import signal

import psutil
import pytest

from conftest import CHECK_LIMIT, NO_TRACES, harness_traces, waits_for

ONE_STACK = ("--stack", "idmapped", "--underlay", "ext4")


def processes_of(*markers):
    """Processes whose command line carries every marker (the run's --section, its
    run directory): other tests running at the same time have their own."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if all(m in cmdline for m in markers) and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(proc.info["pid"])
    return found


def run_dirs(check):
    return [name for name in os.listdir(check.run_base) if name.startswith("run-")]


ANNOUNCE_LIMIT = 120  # from ./check's start to the case's stack mounted
TEARDOWN_LIMIT = 120  # from a signal to ./check's exit


def start_blocking_case(check, marker, stack="idmapped", underlay="ext4"):
    """./check on selftest/005; returns once the case is inside the stack user's
    process with the stack mounted (it says so through a FIFO: no sleep)."""
    fifo = os.path.join(check.run_base, f"announce-{marker}")  # the container must reach it
    for path in (fifo, fifo + ".never"):  # the case blocks opening .never: no writer ever comes
        os.mkfifo(path)
        os.chmod(path, 0o666)
    check.env["STACKCHECK_SELFTEST_FIFO"] = fifo
    proc = check.start("selftest/005", "--stack", stack, "--underlay", underlay, "--section", marker,
                       selftest=True)
    announce = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    exited = os.pidfd_open(proc.pid)
    try:
        # Wait for the announcement, or for ./check to end without making it.
        ready, _, _ = select.select([announce, exited], [], [], ANNOUNCE_LIMIT)
        if announce not in ready:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"selftest/005 never announced itself:\n{out}\n{err}")
        assert os.read(announce, 64) == b"mounted\n"
    finally:
        os.close(announce)
        os.close(exited)
    traces = harness_traces(check.run_base)
    assert traces["mounts"] and (traces["loops"] or traces["zram"]), "the case should be running, its stack mounted"
    return proc


@pytest.mark.parametrize("selftest_case, status", [("selftest/004", 0), ("selftest/001", 1)])
def test_pass_or_fail_leaves_nothing(check, selftest_case, status):
    marker = f"leaktest-{selftest_case.replace('/', '-')}"
    done = check(selftest_case, *ONE_STACK, "--section", marker, selftest=True)
    assert done.returncode == status, done.stdout + done.stderr
    assert harness_traces(check.run_base) == NO_TRACES
    assert processes_of(marker, check.results) == []
    assert run_dirs(check) == []


def test_a_stack_user_left_running_by_a_failed_case_is_ended_before_teardown(check):
    """Its mount namespace would keep the FUSE mount alive: the daemon would hang."""
    done = check("selftest/009", "--stack", "fuse-shift", "--underlay", "ext4", "--section", "leftuser",
                 selftest=True)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "fail with the stack user still running" in done.stdout
    out_bad = open(os.path.join(check.section_dir(), "selftest", "009.fuse-shift-ext4.out.bad")).read()
    assert "teardown" not in out_bad, out_bad
    assert harness_traces(check.run_base) == NO_TRACES
    assert processes_of("leftuser") == []


@waits_for(ANNOUNCE_LIMIT, TEARDOWN_LIMIT)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_mid_case_tears_down(check, signum):
    marker = f"leaktest-signal-{signum}"
    proc = start_blocking_case(check, marker)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=TEARDOWN_LIMIT)
    assert proc.returncode == 2, out + err
    assert harness_traces(check.run_base) == NO_TRACES
    assert processes_of(marker, check.results) == []
    assert run_dirs(check) == []


@waits_for(ANNOUNCE_LIMIT, TEARDOWN_LIMIT, CHECK_LIMIT)
@pytest.mark.parametrize("stack_kind, underlay", [("idmapped", "ext4"), ("fuse-shift", "ext4"),
                                                  ("idmapped", "ext4-zram")])
def test_sigkill_leftovers_are_removed_by_the_next_run(check, stack_kind, underlay):
    if underlay == "ext4-zram" and not os.path.exists("/sys/class/zram-control"):
        pytest.skip("no zram on this machine")
    marker = f"leaktest-sigkill-{stack_kind}-{underlay}"
    proc = start_blocking_case(check, marker, stack_kind, underlay)
    proc.kill()
    proc.communicate(timeout=TEARDOWN_LIMIT)
    left = harness_traces(check.run_base)
    assert left["mounts"], "SIGKILL cannot tear down: the stack and underlay stay mounted"
    (dead_run,) = run_dirs(check)
    daemons = processes_of("harness.stackfs", check.run_base)
    assert bool(daemons) == (stack_kind == "fuse-shift")
    done = check("selftest/004", *ONE_STACK, selftest=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert processes_of("harness.stackfs", check.run_base) == []
    for mountpoint in left["mounts"]:
        assert f"{dead_run}: removed leftover mount {mountpoint}" in done.stderr
    for device in left["zram"]:
        assert f"{dead_run}: removed leftover zram device /dev/{device}" in done.stderr
    assert harness_traces(check.run_base) == NO_TRACES
    assert processes_of(marker, check.results) == []
    assert run_dirs(check) == []


@waits_for(ANNOUNCE_LIMIT, CHECK_LIMIT, TEARDOWN_LIMIT)
def test_live_runs_are_not_touched(check):
    """A second run started while the first is mid-case leaves the first alone."""
    marker = "leaktest-concurrent"
    proc = start_blocking_case(check, marker)
    try:
        before = harness_traces(check.run_base)
        done = check("selftest/004", *ONE_STACK, selftest=True)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "removed leftover" not in done.stderr
        assert harness_traces(check.run_base) == before
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=TEARDOWN_LIMIT)
    assert harness_traces(check.run_base) == NO_TRACES


def test_timeout_fails_the_case_and_still_tears_down(check):
    fifo = os.path.join(check.run_base, "nobody-reads-this")
    os.mkfifo(fifo)
    os.chmod(fifo, 0o666)
    check.env["STACKCHECK_SELFTEST_FIFO"] = fifo  # the case blocks opening it
    done = check("selftest/005", *ONE_STACK, "--timeout", "3", selftest=True)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Timeout" in done.stdout
    assert harness_traces(check.run_base) == NO_TRACES
    assert run_dirs(check) == []


def test_daemon_crash_fails_the_case_with_its_log_and_leaves_no_dead_mount(check):
    done = check("selftest/006", "--stack", "fuse-shift", "--underlay", "tmpfs", selftest=True)
    assert done.returncode == 1, done.stdout + done.stderr
    out_bad = open(os.path.join(check.section_dir(), "selftest", "006.fuse-shift-tmpfs.out.bad")).read()
    assert "fuse-shift died during the case (exit status -9); its log:" in out_bad
    assert harness_traces(check.run_base) == NO_TRACES
    assert processes_of("harness.stackfs", check.run_base) == []
