"""./check --kernel: Debian's kernel under QEMU (TCG here), as an SRU check runs it.

Each test boots a guest (about 10 s to the first case under TCG on this machine
kind): a short selection, a panic, a hang, a baseline across kernels, and
--module on a kernel that loads modules.  A guest's run has its own time limits
(each ./check's, --guest-timeout): pytest's limit for a test is derived from
them (@waits_for), so that it never cuts a guest short and leaves QEMU behind.
"""

import os
import re

import psutil
import pytest

from conftest import CHECK_LIMIT, waits_for
from harness import results as res

KERNEL = "linux-image-amd64"
ONE = ("stack/001", "--stack", "overlay", "--underlay", "tmpfs")
GUEST_LIMIT = 900  # a guest run of a few cases, its boot and the kernel's download included


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


def read(path):
    with open(path, errors="replace") as f:
        return f.read()


@waits_for(GUEST_LIMIT)
def test_cases_run_in_the_guest_with_device_mapper(check):
    done = check("--kernel", KERNEL, *ONE, timeout=GUEST_LIMIT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr
    section = guest_section(check)
    props, cases = res.read_xml(os.path.join(section, "result.xml"))
    assert props["kernel"] == os.path.basename(section) != os.uname().release
    assert props["probe.device-mapper"].startswith("yes")
    assert [c.name for c in cases] == ["stack/001[overlay-tmpfs]"] and cases[0].outcome == res.PASS
    assert os.path.exists(os.path.join(section, "stack", "001.overlay-tmpfs.full"))
    # The user sees the guest's run: the firmware's screen and its escape sequences
    # (clear the screen, no line wrap) are in console.log only.
    shown = done.stdout + done.stderr
    assert not re.search(r"SeaBIOS|iPXE|Booting from|\x1b", shown), shown[:3000]
    assert "SeaBIOS" in read(os.path.join(section, "console.log"))
    # Every path printed is this machine's, as given or absolute: none of the guest's own.
    (console,) = re.findall(r"console in (\S+)$", done.stderr, re.M)
    (results,) = re.findall(r"^results in (\S+)$", done.stdout, re.M)
    assert os.path.samefile(console, os.path.join(section, "console.log")), console
    assert os.path.samefile(results, section), results


@waits_for(GUEST_LIMIT)
def test_a_panicking_guest_is_exit_2_with_its_console(check):
    done = check("--kernel", KERNEL, *ONE, "--kernel-append", "rdinit=/nonexistent", timeout=GUEST_LIMIT)
    assert done.returncode == 2
    assert "stopped before the cases finished" in done.stderr
    console = open(os.path.join(guest_section(check), "console.log"), errors="replace").read()
    assert "Kernel panic" in console


@waits_for(GUEST_LIMIT)
def test_a_hung_guest_is_stopped_by_the_time_limit(check):
    done = check("--kernel", KERNEL, *ONE, "--guest-timeout", "20",
                 "--kernel-append", "rdinit=/bin/busybox -- sleep 3600", timeout=GUEST_LIMIT)
    assert done.returncode == 2
    assert "timed out after" in done.stderr


@waits_for(CHECK_LIMIT, GUEST_LIMIT)
def test_baseline_across_kernels(check):
    """The running kernel's run as the baseline of a run on Debian's kernel."""
    selection = ("stack/00[13]", "--stack", "overlay", "--stack", "idmapped", "--underlay", "tmpfs",
                 "--underlay", "ext4")
    host = check(*selection)
    assert host.returncode == 0, host.stdout + host.stderr
    host_xml = os.path.join(check.results, os.uname().release, "result.xml")
    done = check("--kernel", KERNEL, *selection, "--baseline", host_xml, timeout=GUEST_LIMIT)
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


@waits_for(600, GUEST_LIMIT)
def test_eio_cases_run_over_dm_error_in_the_guest_and_match_fusedev(check):
    """Where the kernel has device-mapper, the eio cases use its error target; their
    results match the bundled faulty device's on this machine."""
    selection = ("-g", "eio", "--underlay", "ext4", *(a for s in EIO_STACKS for a in ("--stack", s)))
    host = check(*selection, "--section", "host-fusedev", timeout=600)
    _, host_cases = res.read_xml(os.path.join(check.results, "host-fusedev", "result.xml"))
    assert {c.name for c in host_cases if c.outcome == res.KNOWN_GAP} == KNOWN_GAPS, host.stdout[-3000:]
    assert host.returncode == 0, host.stdout[-3000:] + host.stderr
    host_xml = os.path.join(check.results, "host-fusedev", "result.xml")
    done = check("--kernel", KERNEL, *selection, "--baseline", host_xml, timeout=GUEST_LIMIT)
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


@waits_for(GUEST_LIMIT)
def test_dm_flakey_drops_writes_in_the_guest(check):
    """drop_writes over device-mapper is a dm-flakey segment; it keeps old data where told."""
    done = check("--kernel", KERNEL, "selftest/008", "--stack", "idmapped", selftest=True, timeout=GUEST_LIMIT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr
    full = open(os.path.join(guest_section(check), "selftest", "008.idmapped-ext4.full")).read()
    assert "faulty device: dm: /dev/mapper/stackcheck-run-" in full


@waits_for(GUEST_LIMIT, 60, CHECK_LIMIT)  # the boot's start (the kernel's download included), QEMU's end
def test_qemu_dies_with_a_killed_run(check):
    """SIGKILL gives ./check no teardown: its QEMU must still not outlive it, and the
    next run removes what it left."""
    proc = check.start("--kernel", KERNEL, *ONE, "--kernel-append", "rdinit=/bin/busybox -- sleep 3600")
    results = os.path.realpath(check.results)
    # ./check says it is booting once QEMU runs: wait for that, not for a time.
    for line in proc.stderr:
        if "under QEMU" in line:
            break
    (guest,) = [psutil.Process(pid) for pid in qemu_processes(results)]
    proc.kill()
    proc.communicate()
    gone, alive = psutil.wait_procs([guest], timeout=60)
    assert not alive, f"QEMU {guest.pid} outlived its killed run"
    after = check("-n", *ONE)
    assert after.returncode == 0, after.stderr
    assert not [name for name in os.listdir(check.run_base) if name.startswith("run-")]


# A module that another holds (a symbol it exports is used): loaded together, the
# first is in use.  Out of tree, built in seconds; each unloads (an init needs an exit).
HELD_TREE = {
    "Kbuild": "obj-m := stackcheck_held.o stackcheck_holder.o\n",
    "stackcheck_held.c": """#include <linux/module.h>
int stackcheck_held_answer(void) { return 42; }
EXPORT_SYMBOL(stackcheck_held_answer);
MODULE_LICENSE("GPL");
""",
    "stackcheck_holder.c": """#include <linux/module.h>
int stackcheck_held_answer(void);
static int __init holder_init(void) { return stackcheck_held_answer() == 42 ? 0 : -EINVAL; }
static void __exit holder_exit(void) { }
module_init(holder_init);
module_exit(holder_exit);
MODULE_LICENSE("GPL");
""",
}
HELD = ("stackcheck_held", "stackcheck_holder")


def write_tree(directory, files):
    os.makedirs(directory)
    for name, text in files.items():
        with open(os.path.join(directory, name), "w") as f:
            f.write(text)
    return str(directory)


def left_loaded(section):
    """The modules loaded in the guest once its ./check had ended (console.log's last word)."""
    (line,) = re.findall(r"stackcheck-guest: the run ended .*; modules loaded: (.*)", read(
        os.path.join(section, "console.log")))
    return set(line.split())


@waits_for(GUEST_LIMIT, GUEST_LIMIT)
def test_module_on_a_kernel_with_module_loading(check, tmp_path):
    """./check --module on a kernel that loads modules (Debian's, in the guest): the
    guest's own ./check is given --module (--guest-module; built here, a cache hit
    there), insmods the modules for its run and rmmods exactly them after it; and
    refuses, exit 2, a module of that name that is loaded and in use."""
    tree = write_tree(tmp_path / "held", HELD_TREE)
    done = check("--kernel", KERNEL, "--guest-module", tree, *ONE, timeout=GUEST_LIMIT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr
    section = guest_section(check)
    build_log = read(os.path.join(section, "build.log"))
    guest_build = build_log[build_log.index("--module " + check.results):]
    assert "cached: " in guest_build and "$ make" not in guest_build, guest_build
    props, _ = res.read_xml(os.path.join(section, "result.xml"))
    for name in HELD:  # loaded for the run: the kernel's srcversion is the build's
        built = props[f"module.{name}"].split("; srcversion ")[1].split(";")[0]
        assert f"loaded srcversion {built};" in props[f"module.{name}"], props[f"module.{name}"]
    assert not left_loaded(section) & set(HELD)
    assert "loop" in left_loaded(section)  # the kernel's own stay

    # Loaded at boot (--module), the first held by the second: the guest's ./check refuses it.
    os.rename(section, str(tmp_path / "first"))
    done = check("--kernel", KERNEL, "--module", tree, "--guest-module", tree, *ONE, timeout=GUEST_LIMIT)
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr
    assert ("check: module stackcheck_held is loaded and in use (refcnt 1, held by stackcheck_holder): "
            "stackcheck will not replace it") in done.stdout, done.stdout[-3000:]
    assert left_loaded(guest_section(check)) >= set(HELD)
