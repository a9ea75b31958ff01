"""./check --kernel: Debian's kernel under QEMU (TCG here), as an SRU check runs it.

Each test boots a guest (about 10 s to the first case under TCG on this machine
kind): a short selection, a panic, a hang, and a baseline across kernels.
"""

import os

import psutil
import pytest

from harness import results as res

# A guest's run has its own time limits (the subprocess's, --guest-timeout); pytest's
# per-test limit must not cut it first and leave its QEMU behind.
pytestmark = pytest.mark.timeout(1500)
KERNEL = "linux-image-amd64"
ONE = ("stack/001", "--stack", "overlay", "--underlay", "tmpfs")


def qemu_processes(results):
    """QEMU processes of this test's guests: they share its results directory."""
    return [p.pid for p in psutil.process_iter(["name", "cmdline"])
            if (p.info["name"] or "").startswith("qemu-system") and results in " ".join(p.info["cmdline"] or [])]


@pytest.fixture(autouse=True)
def no_qemu_left(check):
    yield
    assert qemu_processes(os.path.realpath(check.results)) == []


def guest_section(check):
    sections = [d for d in os.listdir(check.results) if os.path.isfile(os.path.join(check.results, d, "console.log"))]
    assert len(sections) == 1, sections
    return os.path.join(check.results, sections[0])


def test_cases_run_in_the_guest_with_device_mapper(check):
    done = check("--kernel", KERNEL, *ONE, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr
    section = guest_section(check)
    props, cases = res.read_xml(os.path.join(section, "result.xml"))
    assert props["kernel"] == os.path.basename(section) != os.uname().release
    assert props["probe.device-mapper"].startswith("yes")
    assert [c.name for c in cases] == ["stack/001[overlay-tmpfs]"] and cases[0].outcome == res.PASS
    assert os.path.exists(os.path.join(section, "stack", "001.overlay-tmpfs.full"))


def test_a_panicking_guest_is_exit_2_with_its_console(check):
    done = check("--kernel", KERNEL, *ONE, "--kernel-append", "rdinit=/nonexistent", timeout=900)
    assert done.returncode == 2
    assert "stopped before the cases finished" in done.stderr
    console = open(os.path.join(guest_section(check), "console.log"), errors="replace").read()
    assert "Kernel panic" in console


def test_a_hung_guest_is_stopped_by_the_time_limit(check):
    done = check("--kernel", KERNEL, *ONE, "--guest-timeout", "20",
                 "--kernel-append", "rdinit=/bin/busybox -- sleep 3600", timeout=900)
    assert done.returncode == 2
    assert "timed out after" in done.stderr


def test_baseline_across_kernels(check):
    """The running kernel's run as the baseline of a run on Debian's kernel."""
    selection = ("stack/00[13]", "--stack", "overlay", "--stack", "idmapped", "--underlay", "tmpfs",
                 "--underlay", "ext4")
    host = check(*selection)
    assert host.returncode == 0, host.stdout + host.stderr
    host_xml = os.path.join(check.results, os.uname().release, "result.xml")
    done = check("--kernel", KERNEL, *selection, "--baseline", host_xml, timeout=900)
    # Debian's 6.1 has neither O_TMPFILE on overlayfs nor idmapped tmpfs: newly not run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr
    newly = done.stdout.split("Newly not run: ")[1].splitlines()[0]
    assert "stack/003[overlay-tmpfs]" in newly
    assert "stack/001[idmapped-tmpfs] (tmpfs cannot be idmapped" in newly
    assert "Regressions: none" in done.stdout
    report = open(os.path.join(guest_section(check), "report.html")).read()
    assert "baseline" in report and os.uname().release in report


EIO_STACKS = ("overlay", "overlay_volatile", "idmapped", "fuse-shift", "fuse-union")
# Rules no kernel keeps yet (harness/errseq.py): known gaps on both kernels, naming the gap.
KNOWN_GAPS = {"stack/042[overlay-ext4]", "stack/042[fuse-shift-ext4]", "stack/042[fuse-union-ext4]"}


def test_eio_cases_run_over_dm_error_in_the_guest_and_match_fusedev(check):
    """Where the kernel has device-mapper, the eio cases use its error target; their
    results match the bundled faulty device's on this machine."""
    selection = ("-g", "eio", "--underlay", "ext4", *(a for s in EIO_STACKS for a in ("--stack", s)))
    host = check(*selection, "--section", "host-fusedev")
    _, host_cases = res.read_xml(os.path.join(check.results, "host-fusedev", "result.xml"))
    assert {c.name for c in host_cases if c.outcome == res.KNOWN_GAP} == KNOWN_GAPS, host.stdout[-3000:]
    assert host.returncode == 0, host.stdout[-3000:] + host.stderr
    host_xml = os.path.join(check.results, "host-fusedev", "result.xml")
    done = check("--kernel", KERNEL, *selection, "--baseline", host_xml, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr
    assert "Regressions: none" in done.stdout and "Newly not run" not in done.stdout
    still = [line.split(": ", 1)[1].split() for line in done.stdout.splitlines()
             if line.startswith("Known gaps, still open: ")]
    assert "Fixed" not in done.stdout and "Still failing" not in done.stdout, done.stdout[-3000:]
    assert [set(names) for names in still] == [KNOWN_GAPS], done.stdout[-3000:]
    section = guest_section(check)
    for name in ("040.idmapped-ext4", "043.overlay_volatile-ext4"):
        assert "faulty device: dm: /dev/mapper/stackcheck-run-" in open(os.path.join(section, "stack", f"{name}.full")).read()
    host_full = open(os.path.join(check.results, "host-fusedev", "stack", "040.idmapped-ext4.full")).read()
    assert "faulty device: fusedev" in host_full


def test_dm_flakey_drops_writes_in_the_guest(check):
    """drop_writes over device-mapper is a dm-flakey segment; it keeps old data where told."""
    done = check("--kernel", KERNEL, "selftest/008", "--stack", "idmapped", selftest=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr
    full = open(os.path.join(guest_section(check), "selftest", "008.idmapped-ext4.full")).read()
    assert "faulty device: dm: /dev/mapper/stackcheck-run-" in full


def test_qemu_dies_with_a_killed_run(check):
    """SIGKILL gives ./check no teardown: its QEMU must still not outlive it."""
    proc = check.start("--kernel", KERNEL, *ONE, "--kernel-append", "rdinit=/bin/busybox -- sleep 3600")
    results = os.path.realpath(check.results)
    # QEMU prints the boot firmware's banner as soon as it runs: wait for that, not for a time.
    for line in proc.stdout:
        if "SeaBIOS" in line or "Booting" in line:
            break
    (guest,) = [psutil.Process(pid) for pid in qemu_processes(results)]
    proc.kill()
    proc.communicate()
    gone, alive = psutil.wait_procs([guest], timeout=60)
    assert not alive, f"QEMU {guest.pid} outlived its killed run"
