"""Proof that the suite catches the bugs it exists for.

Each bug switch of stackfs brings back one historical bug.  The cases run on
the fuse-shift stack without it (all pass) and with it (exactly the cases of
that bug fail, and their messages name the scenario step and the errno or
the differing content).
"""

import os
import re

import psutil
import pytest

from conftest import waits_for

FUSE_SHIFT = ("--stack", "fuse-shift", "--underlay", "tmpfs", "-j", "2")
NAME = re.compile(r"^(stack/\d+)\[fuse-shift-tmpfs\] - (.*) \(see ", re.M)

SWITCHES = {
    # switch: (cases that must fail, words every failure message must hold)
    "estale-reopen": ({"stack/001", "stack/002"}, ("S1.", "got ESTALE")),
    "unlinked-special": ({"stack/005", "stack/006", "stack/007"}, ("S2 fstat(fd) of the unlinked", "got ENOENT")),
    "stale-dentry": ({"stack/010", "stack/011", "stack/013", "stack/014", "stack/015", "stack/016", "stack/017",
                      "stack/018"}, ("S3 ",)),
    # shiftfs as its LP#1879196 fix left it: only the backup-by-rename save, whose old F lives on as F~
    "renamed-lower": ({"stack/011", "stack/016", "stack/017", "stack/018"}, ("S3 ", "md5 of F", ": expected ")),
}
# The sync switches' cases are the eio group: a writeback error on a faulty device.
SYNC_SWITCHES = {
    "sync-swallow": "first fsync after the device failed: expected EIO, got success",
    "sync-repeat": "second fsync: the error was reported to this fd already: expected success, got EIO",
}
EIO_RUN = ("--stack", "fuse-shift", "--underlay", "ext4", "-g", "eio")


MD5_DIFFERS = r"md5 of F: expected [0-9a-f]{32}, got [0-9a-f]{32}"
UNDERLAY_DIFFERS = r"on the underlay: d/F~?: expected b'"
# The real clients' matrix (cases/test_editors.py): the saves that give F a new inode.
EDITORS_RED = {"stack/050", "stack/053", "stack/054", "stack/055", "stack/056", "stack/058",
               "stack/059", "stack/060", "stack/061", "stack/062"}
EDITORS_IN_PLACE = {"stack/051", "stack/052", "stack/057", "stack/063"}
# The clients saving in the container after the host's backup-by-rename save (stale-dentry
# breaks 070, 071 and 073 before that; emacs then waits on its lock file until the timeout).
CONTAINER_SAVES = {"stack/070", "stack/071", "stack/072", "stack/073", "stack/074", "stack/075"}
EDITORS_MATRIX = {
    # switch: (cases run, cases that go red)
    "stale-dentry": (EDITORS_RED | EDITORS_IN_PLACE, EDITORS_RED),
    # as real shiftfs: of the host's saves only those that rename F to a backup (emacs, brz revert)
    "renamed-lower": (EDITORS_RED | EDITORS_IN_PLACE | CONTAINER_SAVES,
                      {"stack/050", "stack/053", "stack/054"} | CONTAINER_SAVES),
}


def failures(stdout):
    return {case: message for case, message in NAME.findall(stdout)}


@waits_for(900)
def test_no_switch_all_pass(check):
    done = check(*FUSE_SHIFT, "-g", "quick", timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr
    assert failures(done.stdout) == {}


@waits_for(900)
@pytest.mark.parametrize("switch", sorted(SWITCHES))
def test_switch_turns_its_cases_red(check, switch):
    expected, words = SWITCHES[switch]
    done = check(*FUSE_SHIFT, "-g", "quick", "--stack-option", f"bug={switch}", timeout=900)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr
    failed = failures(done.stdout)
    assert set(failed) == expected, done.stdout[-3000:]
    for case, message in failed.items():
        for word in words:
            assert word in message, f"{case}: {message}"
    out_bad = open(os.path.join(check.section_dir(), f"{min(expected)}.fuse-shift-tmpfs.out.bad")).read()
    assert "stack fuse-shift, underlay tmpfs" in out_bad
    full = open(os.path.join(check.section_dir(), f"{min(expected)}.fuse-shift-tmpfs.full")).read()
    assert f"bug={switch}" in full


@waits_for(900)
def test_stale_dentry_spares_the_in_place_control(check):
    """LP#1879196 needs a new inode: an edit in place (backup-by-copying) is still seen."""
    done = check(*FUSE_SHIFT, "stack/012", "--stack-option", "bug=stale-dentry", timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr


@waits_for(900)
def test_stale_dentry_shows_the_differing_md5(check):
    done = check(*FUSE_SHIFT, "stack/010", "--stack-option", "bug=stale-dentry", timeout=900)
    message = failures(done.stdout)["stack/010"]
    assert re.search(MD5_DIFFERS, message), message


@waits_for(1200, 1200)
@pytest.mark.parametrize("switch", sorted(EDITORS_MATRIX))
def test_matrix_of_the_real_clients(check, switch):
    """The host's saves go red with the differing md5 sums, the container's saves with what
    landed where on the underlay; the others stay green, and all are green without the switch."""
    selection, red = (sorted(cases) for cases in EDITORS_MATRIX[switch])
    done = check(*FUSE_SHIFT, *selection, "--stack-option", f"bug={switch}", timeout=1200)
    failed = failures(done.stdout)
    assert set(failed) == set(red), done.stdout[-3000:]
    for case, message in failed.items():
        differs = UNDERLAY_DIFFERS if case in CONTAINER_SAVES else MD5_DIFFERS
        assert message.startswith("S3 ") and re.search(differs, message), f"{case}: {message}"
    assert processes_inside(check.run_base) == [], "a failed case left an editor, daemon or container process"
    clean = check(*FUSE_SHIFT, *selection, timeout=1200)
    assert clean.returncode == 0, clean.stdout[-3000:] + clean.stderr
    assert processes_inside(check.run_base) == [], "an editor, daemon or container process was left"


def processes_inside(directory):
    """Processes whose cwd or command line is in directory (clients, stack users, daemons)."""
    found = []
    for proc in psutil.process_iter(["pid", "name", "cwd", "cmdline"]):
        if directory in (proc.info["cwd"] or "") or directory in " ".join(proc.info["cmdline"] or []):
            found.append(f"{proc.info['pid']} {proc.info['name']}")
    return found


# stack/042 stops at a known gap on every FUSE stack without a switch: the kernel never
# sends syncfs to a FUSE server (harness/errseq.py).  sync-swallow moves it to the fsync
# step, whose rule every release keeps: a failure again.
GAP_042 = "S5.1 F1: syncfs after the failed writeback: expected EIO, got success [known gap"
FSYNC_042 = "S5.1 F1: fsync after the failed writeback: expected EIO, got success"


def eio_failures(stdout):
    return {c: m for c, m in re.findall(r"^(stack/\d+)\[fuse-shift-ext4\] - (.*) \(see ", stdout, re.M)}


def eio_known_gaps(stdout):
    return {c: m for c, m in re.findall(r"^(stack/\d+)\[fuse-shift-ext4\] \[known gap\] (.*)  \[", stdout, re.M)}


@waits_for(900, 900)
def test_a_known_gap_is_shown_and_passes_unless_strict(check):
    healthy = check(*EIO_RUN, timeout=900)
    assert healthy.returncode == 0, healthy.stdout[-3000:] + healthy.stderr
    assert eio_failures(healthy.stdout) == {}
    gaps = eio_known_gaps(healthy.stdout)
    assert set(gaps) == {"stack/042"} and gaps["stack/042"].startswith(GAP_042), healthy.stdout[-3000:]
    assert "Known gaps: stack/042[fuse-shift-ext4]" in healthy.stdout
    assert "(1 known gaps, listed above)" in healthy.stdout
    with open(os.path.join(check.section_dir(), "check.log")) as f:
        log = f.read()
    assert "Known gaps: stack/042[fuse-shift-ext4]" in log and "(1 known gaps, listed above)" in log, log
    strict = check(*EIO_RUN, "stack/042", "--strict", "--section", "strict", timeout=900)
    assert strict.returncode == 1, strict.stdout[-3000:] + strict.stderr
    assert eio_failures(strict.stdout)["stack/042"].startswith(GAP_042)


@waits_for(900)
@pytest.mark.parametrize("switch", sorted(SYNC_SWITCHES))
def test_sync_switch_turns_the_eio_case_red(check, switch):
    done = check(*EIO_RUN, "--stack-option", f"bug={switch}", "--section", switch, timeout=900)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr
    failed, gaps = eio_failures(done.stdout), eio_known_gaps(done.stdout)
    assert SYNC_SWITCHES[switch] in failed["stack/040"]
    if switch == "sync-swallow":  # a failure at a step with no known-gap rule stays a failure
        assert set(failed) == {"stack/040", "stack/042"} and not gaps, done.stdout[-3000:]
        assert FSYNC_042 in failed["stack/042"]
    else:
        assert set(failed) == {"stack/040"} and set(gaps) == {"stack/042"}, done.stdout[-3000:]


@waits_for(900)
@pytest.mark.parametrize("switch", sorted(SYNC_SWITCHES))
def test_sync_switches_do_not_disturb_a_healthy_device(check, switch):
    """They only change how errors are reported: with no fault, syncs stay green."""
    done = check(*FUSE_SHIFT, "-g", "sync", "--stack-option", f"bug={switch}", timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr
