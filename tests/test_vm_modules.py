"""Modules under test in a guest: our own small DKMS module, real shiftfs and a
patched overlayfs built from source for Debian's 6.1 kernel, loaded before the
probe, named in every report (./check --kernel ... --module ...); and a kernel
split over several packages.

Each test boots a guest under TCG (about 15 s to the first case).
"""

import html
import os
import shutil
import subprocess

import pytest

from conftest import CHECK_LIMIT, ROOT, SHIFTFS, needs_shiftfs, waits_for
from harness import results as res, vm
from module_tree import NAME, write_dkms_tree
from test_vm import KERNEL, ONE, guest_section, no_qemu_left  # noqa: F401 - the fixture checks every test

SYNCFS_PATCH = os.path.join(ROOT, "tests", "patches", "ovl-syncfs-reports-upper-errors.patch")
QUICK_ON = ("-g", "quick", "--underlay", "ext4", "--underlay", "tmpfs")
# What real shiftfs (this port, on Debian's 6.1) does not keep of the scenarios' rules: findings,
# each failing at the step that names the rule.  The rest of what idmapped mounts pass, it passes.
SHIFTFS_FINDINGS = {
    ("stack/011", "ext4"): "S3 rename F to F~, write a new F, seen through the stack at once: read: md5 of F",
    ("stack/011", "tmpfs"): "S3 rename F to F~, write a new F, seen through the stack at once: read: md5 of F",
    ("stack/020", "ext4"): "S4 the ACL names uid 1000 on disk: got [101000]",
}
for _underlay in ("ext4", "tmpfs"):  # LP#1879196 as its reporter saw it: a name keeps the renamed lower file
    SHIFTFS_FINDINGS.update({
        ("stack/016", _underlay): "S3 backup-by-rename, then the container writes F, on the underlay: "
                                  "md5 of F (the container's write)",
        ("stack/017", _underlay): "S3 backup-by-rename after a stat-only warm-up, seen through the stack at once: "
                                  "md5 of F",
        ("stack/018", _underlay): "S3 backup-by-rename, F read by its name relative to the cwd, seen through the "
                                  "stack at once: md5 of F"})

# What it cannot run: no O_TMPFILE through shiftfs; nodev in the container's user namespace
# (expunges/shiftfs.txt); and what Debian's 6.1 lacks that this machine's kernel has.
SHIFTFS_NOT_RUN = {("stack/003", "ext4"): "does not support O_TMPFILE", ("stack/003", "tmpfs"): "does not support O_TMPFILE",
                   ("stack/005", "ext4"): "SB_I_NODEV", ("stack/005", "tmpfs"): "SB_I_NODEV",
                   ("stack/020", "tmpfs"): "tmpfs has no user xattrs"}


def by_case_and_underlay(section):
    _, cases = res.read_xml(os.path.join(section, "result.xml"))
    return {(c.case_id, c.underlay): c for c in cases}


def module_property(section, name):
    props, _ = res.read_xml(os.path.join(section, "result.xml"))
    return props[f"module.{name}"]


def read(path):
    with open(path, errors="replace") as f:
        return f.read()


def taint_flags(line):
    """The flags of the taint a module line records: '; taint 12288 (OE)'."""
    return set(line.rsplit("; taint ", 1)[1].split("(")[1].rstrip(")"))


def loaded_is_built(line):
    """The kernel loaded the very file that was built: its srcversion."""
    built = line.split("; srcversion ")[1].split(";")[0]
    return f"loaded srcversion {built};" in line


@needs_shiftfs
@waits_for(900, 1200)
def test_real_shiftfs_runs_what_idmapped_passes(check, tmp_path):
    host = check("--stack", "idmapped", *QUICK_ON, "--results", str(tmp_path / "host"), timeout=900)
    assert host.returncode == 0, host.stdout[-3000:] + host.stderr
    idmapped = by_case_and_underlay(os.path.join(tmp_path / "host", os.uname().release))
    done = check("--kernel", KERNEL, "--module", SHIFTFS, "--stack", "shiftfs", *QUICK_ON, timeout=1200)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr
    section = guest_section(check)
    shiftfs = by_case_and_underlay(section)
    for key, case in idmapped.items():
        if case.outcome != res.PASS:
            continue
        seen = shiftfs[key]
        if key in SHIFTFS_FINDINGS:
            assert seen.outcome == res.FAIL and seen.reason.startswith(SHIFTFS_FINDINGS[key]), (key, seen.reason)
        elif key in SHIFTFS_NOT_RUN:
            assert seen.outcome == res.NOTRUN and SHIFTFS_NOT_RUN[key] in seen.reason, seen.reason
        else:
            assert seen.outcome == res.PASS, (key, seen.outcome, seen.reason)
    line = module_property(section, "shiftfs")
    assert f"{SHIFTFS} (dkms shiftfs)" in line and "vermagic 6.1.0-" in line and loaded_is_built(line), line
    full = open(os.path.join(section, "stack", "001.shiftfs-ext4.full")).read()
    assert "module:   shiftfs: " in full
    assert "shiftfs: " in open(os.path.join(section, "report.html")).read()


# LP#1879196 as its reporter saw it: the S3 cases that real shiftfs fails, and the fix of
# examples/ that passes them (the fix-verification workflow, short form: one underlay, no editors).
RENAMED_LOWER = ("stack/011", "stack/016", "stack/017", "stack/018")
REVALIDATE_PATCH = os.path.join(ROOT, "examples", "shiftfs-revalidate-renamed-lower.patch")


@needs_shiftfs
@waits_for(900, 900)
def test_the_shiftfs_fix_of_examples_passes_what_unpatched_shiftfs_fails(check, tmp_path):
    s3 = ("--stack", "shiftfs", "--underlay", "tmpfs", "-g", "rename", "-x", "editors")
    unpatched = check("--kernel", KERNEL, "--module", SHIFTFS, *s3, "--results", str(tmp_path / "unpatched"),
                      timeout=900)
    assert unpatched.returncode == 1, unpatched.stdout[-3000:] + unpatched.stderr
    (section,) = [d for d in (tmp_path / "unpatched").iterdir() if (d / "console.log").exists()]
    failed = {c.case_id for c in by_case_and_underlay(section).values() if c.outcome == res.FAIL}
    assert failed == set(RENAMED_LOWER), failed
    done = check("--kernel", KERNEL, "--module", f"{SHIFTFS}+{REVALIDATE_PATCH}", *s3,
                 "--baseline", str(tmp_path / "unpatched"), timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr
    fixed = done.stdout.split("\nFixed: ", 1)[1].splitlines()[0].split()
    assert sorted(fixed) == [f"{c}[shiftfs-tmpfs]" for c in RENAMED_LOWER], done.stdout[-3000:]
    assert "Regressions: none" in done.stdout
    line = module_property(guest_section(check), "shiftfs")
    assert f"{SHIFTFS} (dkms shiftfs) + {os.path.basename(REVALIDATE_PATCH)}; " in line and loaded_is_built(line), line


@waits_for(900, 1200)
def test_every_report_names_the_modules_and_a_patched_overlay_closes_the_syncfs_gap(check, tmp_path):
    """Debian's own overlayfs, rebuilt with tests/patches' fix: stack/042's known gap
    closes, and the comparison with the stock module's run says so, and which code ran.
    The stock run loads our own DKMS module besides: with the kernel's own overlayfs (in
    tree, signed) it alone taints the kernel, out of tree (O) and unsigned (E)."""
    eio = ("-g", "eio", "--stack", "overlay", "--underlay", "ext4")
    hello = write_dkms_tree(tmp_path / NAME)
    stock = check("--kernel", KERNEL, "--module", hello, *eio, "--results", str(tmp_path / "stock"), timeout=900)
    assert stock.returncode == 0, stock.stdout[-3000:] + stock.stderr
    assert "Known gaps: stack/042[overlay-ext4]" in stock.stdout
    (stock_section,) = [os.path.join(tmp_path / "stock", d) for d in os.listdir(tmp_path / "stock")]
    hello_line = module_property(stock_section, NAME)
    assert hello_line.startswith(f"{NAME}: {hello} (dkms {NAME}); source sha256 "), hello_line
    assert "; vermagic 6.1.0-" in hello_line and loaded_is_built(hello_line), hello_line
    assert {"O", "E"} <= taint_flags(hello_line), hello_line
    assert f"\nmodule:   {hello_line}\n" in read(os.path.join(stock_section, "stack", "042.overlay-ext4.full"))
    assert f"module {html.escape(hello_line)}<" in read(os.path.join(stock_section, "report.html"))
    done = check("--kernel", KERNEL, "--module", f"linux-source:fs/overlayfs+{SYNCFS_PATCH}", *eio,
                 "--baseline", os.path.join(stock_section, "result.xml"), timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr
    assert "Known gaps closed: stack/042[overlay-ext4]" in done.stdout
    assert "Regressions: none" in done.stdout
    assert "Module overlay differs: baseline: the kernel's own; candidate: overlay: linux-source-6.1 " in done.stdout
    assert f"Module {NAME} differs: baseline: {hello_line}; candidate: the kernel's own\n" in done.stdout
    line = module_property(guest_section(check), "overlay")
    assert "fs/overlayfs + ovl-syncfs-reports-upper-errors.patch; ovl-syncfs-reports-upper-errors.patch sha256 " in line
    assert loaded_is_built(line), line


@waits_for(900, 900)
def test_a_patch_that_does_not_apply_and_a_build_that_fails_are_exit_2(check, tmp_path):
    stale = tmp_path / "stale.patch"
    stale.write_text(open(SYNCFS_PATCH).read().replace("int ret;", "int ret2;"))
    done = check("--kernel", KERNEL, "--module", f"linux-source:fs/overlayfs+{stale}", *ONE, timeout=900)
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "stale.patch" in done.stderr, done.stderr
    broken = write_dkms_tree(tmp_path / NAME)
    with open(os.path.join(broken, f"{NAME}.c"), "a") as f:
        f.write("int broken(void) { return }\n")
    done = check("--kernel", KERNEL, "--module", broken, *ONE, timeout=900)
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr
    assert done.stderr.count("\n") == 1 and f"--module {broken}: building for kernel 6.1.0-" in done.stderr
    assert "failed (see " in done.stderr and f"{NAME}.c:" in done.stderr, done.stderr
    assert not any(name.startswith("qemu") for name in os.listdir(check.results))


@waits_for(CHECK_LIMIT)
def test_module_without_a_guest_on_a_kernel_without_module_loading_is_exit_2(check, tmp_path):
    if os.path.exists("/proc/modules"):
        pytest.skip("this kernel loads modules: --module runs on the host here")
    done = check("--module", write_dkms_tree(tmp_path / NAME), *ONE)
    assert done.returncode == 2
    assert "has no module loading" in done.stderr and "--kernel" in done.stderr


def _split_debian_image(tmp_path):
    """Debian's image package cut in two as Ubuntu ships a kernel: an image with the
    kernel and the drivers, and a modules package with the filesystems and the network."""
    kernel = vm.resolve_kernel(KERNEL)
    tree = os.path.dirname(os.path.dirname(os.path.dirname(kernel.modules_dir)))
    parts = {"linux-image-unsigned-split": lambda rel: rel.startswith("boot/") or "/kernel/fs/" not in rel
             and "/kernel/net/" not in rel,
             "linux-modules-extra-split": lambda rel: "/kernel/fs/" in rel or "/kernel/net/" in rel}
    out = tmp_path / "debs"
    out.mkdir()
    for name, wanted in parts.items():
        root = tmp_path / name
        for directory, _, files in os.walk(tree):
            for f in files:
                rel = os.path.relpath(os.path.join(directory, f), tree)
                if rel.startswith((".", "DEBIAN")) or not wanted(rel):
                    continue
                os.makedirs(root / os.path.dirname(rel), exist_ok=True)
                shutil.copy2(os.path.join(directory, f), root / rel)
        (root / "DEBIAN").mkdir()
        (root / "DEBIAN" / "control").write_text(
            f"Package: {name}\nVersion: {kernel.version}\nArchitecture: amd64\n"
            "Maintainer: stackcheck <stackcheck@localhost>\nDescription: part of a split kernel\n")
        subprocess.run(["dpkg-deb", "-Zgzip", "-z1", "-b", str(root), str(out / f"{name}.deb")], check=True,
                       capture_output=True)
    return out


@waits_for(900, 900)
def test_a_kernel_split_over_packages_boots_whole(check, tmp_path, monkeypatch):
    debs = _split_debian_image(tmp_path)
    done = check("--kernel", str(debs), *ONE, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr
    _, cases = res.read_xml(os.path.join(guest_section(check), "result.xml"))
    assert [(c.name, c.outcome) for c in cases] == [("stack/001[overlay-tmpfs]", res.PASS)]
    alone = check("--kernel", str(debs / "linux-modules-extra-split.deb"), *ONE, timeout=900)
    assert alone.returncode == 2 and "no boot/vmlinuz-" in alone.stderr, alone.stderr
