"""./check end to end, as a user runs it: outcomes, result files, exit statuses."""

import os
import shutil
import subprocess
import xml.etree.ElementTree as ET

import pytest

from conftest import CHECK_LIMIT, harness_traces, waits_for

ONE_STACK = ("--stack", "overlay", "--underlay", "tmpfs")


def read(path):
    with open(path) as f:
        return f.read()


def junit_cases(section_dir):
    suite = ET.parse(os.path.join(section_dir, "result.xml")).getroot()
    return suite, {tc.get("name"): tc for tc in suite.iter("testcase")}


def test_failing_case_gives_failure_out_bad_junit_and_exit_1(check):
    done = check("selftest/001", "selftest/004", *ONE_STACK, selftest=True)
    assert done.returncode == 1, done.stdout + done.stderr
    section = check.section_dir()
    out_bad = read(os.path.join(section, "selftest", "001.overlay-tmpfs.out.bad"))
    assert "selftest: open a file that was never created: expected success, got ENOENT" in out_bad
    assert "underlay tmpfs" in out_bad
    assert not os.path.exists(os.path.join(section, "selftest", "004.overlay-tmpfs.out.bad"))
    assert os.path.exists(os.path.join(section, "selftest", "004.overlay-tmpfs.full"))
    suite, cases = junit_cases(section)
    assert cases["selftest/001[overlay-tmpfs]"].find("failure") is not None
    assert cases["selftest/004[overlay-tmpfs]"].find("failure") is None
    properties = {p.get("name"): p.get("value") for p in suite.find("properties")}
    assert properties["kernel"] == os.uname().release
    assert properties["probe.overlay@tmpfs"] == "yes"
    assert "Failures: selftest/001[overlay-tmpfs]" in done.stdout
    assert "Failed 1 of 2 tests" in done.stdout
    log = read(os.path.join(section, "check.log"))
    assert "Failures: selftest/001[overlay-tmpfs]" in log


def test_unmet_need_is_not_run_with_its_reason(check):
    done = check("selftest/002", *ONE_STACK, selftest=True)
    assert done.returncode == 0, done.stdout + done.stderr
    reason = f"kernel {os.uname().release} is older than 99.0"
    assert f"[not run] {reason}" in done.stdout
    assert "Not run: selftest/002[overlay-tmpfs]" in done.stdout
    _, cases = junit_cases(check.section_dir())
    assert cases["selftest/002[overlay-tmpfs]"].find("skipped").get("message") == reason


def test_kernel_warning_fails_the_case_and_saves_dmesg(check):
    done = check("selftest/003", *ONE_STACK, selftest=True)
    assert done.returncode == 1, done.stdout + done.stderr
    dmesg = read(os.path.join(check.section_dir(), "selftest", "003.overlay-tmpfs.dmesg"))
    assert "WARNING: injected by selftest/003" in dmesg
    out_bad = read(os.path.join(check.section_dir(), "selftest", "003.overlay-tmpfs.out.bad"))
    assert "kernel log during the case" in out_bad


def test_another_runs_injected_warning_is_ignored(check):
    """A run only counts the injected test warnings that name it."""
    from harness import kmsg
    watcher = kmsg.KernelLog()
    kmsg.inject("WARNING: for some other run", "run-0-other")
    lines = watcher.read()
    watcher.close()
    assert any("for some other run" in line for line in lines)
    assert kmsg.bad_lines(lines, "run-1-mine") == []
    assert kmsg.bad_lines(lines, "run-0-other")


@waits_for(CHECK_LIMIT, CHECK_LIMIT)
def test_pass_then_fail_then_pass_keeps_result_files_current(check):
    assert check("selftest/004", *ONE_STACK, selftest=True).returncode == 0
    assert check("selftest/001", *ONE_STACK, selftest=True).returncode == 1
    log = read(os.path.join(check.section_dir(), "check.log"))
    assert log.count("Ran: ") == 2
    assert "Passed all 1 tests" in log and "Failed 1 of 1 tests" in log


@pytest.mark.parametrize("args, message", [
    (("stack/999",), "check: unknown case id: stack/999"),
    (("-g", "nosuchgroup"), "check: unknown group: nosuchgroup"),
    (("--stack", "nosuchstack"), "check: unknown stack: nosuchstack"),
    (("--underlay", "ntfs"), "check: unknown underlay: ntfs"),
    (("--stack", "shiftfs"), "check: stack shiftfs is not available: kernel has no shiftfs"),
    (("--results", "/proc/stackcheck-results"), "check: cannot write results to /proc/stackcheck-results"),
    (("--frobnicate",), "check: unrecognized arguments: --frobnicate"),
])
def test_bad_input_is_one_line_and_exit_2(check, args, message):
    if "shiftfs" in args and "shiftfs" in read("/proc/filesystems"):
        pytest.skip("this kernel has shiftfs")
    before = harness_traces(check.run_base)
    done = check(*args)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()], done.stderr
    assert done.stderr.startswith(message), done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert harness_traces(check.run_base) == before


def test_not_root_is_refused_before_any_set_up(run_base):
    """A fresh clone run by a normal user: bootstrap refuses before making a venv."""
    from conftest import ROOT
    clone = os.path.join(run_base, "clone")  # reachable by nobody, unlike the real clone may be
    shutil.copytree(ROOT, clone, ignore=shutil.ignore_patterns(".venv", ".git", "results"))
    done = subprocess.run([os.path.join(clone, "check"), "-n"], capture_output=True, text=True,
                          preexec_fn=lambda: (os.setgid(65534), os.setuid(65534)))
    assert done.returncode == 2
    assert done.stderr.strip() == "stackcheck: must be run as root (it mounts filesystems and attaches loop devices)"
    assert not os.path.exists(os.path.join(clone, ".venv"))


def test_not_root_is_refused_by_the_front_end(monkeypatch, capsys):
    from harness import cli
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert cli.main(["-g", "quick"]) == 2
    assert capsys.readouterr().err == "check: must be run as root (it mounts filesystems and attaches loop devices)\n"


def test_dry_run_lists_what_would_run_and_why_not(check):
    done = check("-n", "selftest/00[24]", *ONE_STACK, selftest=True)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert any(line.startswith("selftest/004 [overlay-tmpfs]") and "would run" in line for line in lines)
    assert any(line.startswith("selftest/002 [overlay-tmpfs]") and "not run: kernel" in line for line in lines)
    assert not os.path.exists(check.results) or not os.listdir(check.results)


def test_probe_prints_the_table(check):
    done = check("--probe")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"kernel        {os.uname().release}")
    for row in ("overlay.volatile", "idmapped", "device-mapper", "shiftfs", "userns", "fuse"):
        assert row in done.stdout


@waits_for(900)
def test_quick_group_passes_on_this_machine(check):
    """The suite itself: every quick case passes or is not run for a machine reason."""
    done = check("-g", "quick", "-j", "2", timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr
    assert "Passed all" in done.stdout
    suite, cases = junit_cases(check.section_dir())
    ran = [name for name, tc in cases.items() if tc.find("skipped") is None]
    assert any("[idmapped-ext4]" in name for name in ran)
    assert any("[overlay-xfs]" in name for name in ran)
