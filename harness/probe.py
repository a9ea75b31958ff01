"""What the running kernel and machine can do, found by trying it on scratch.

The probe runs once per run; its result is plain data (JSON) handed to every
worker and written into the results.  Each feature is either present or
absent with the exact reason, which is what a case that needs it reports as
"not run".  Per-filesystem features are named "<feature>@<fs>".
"""

import errno
import json
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass, field

from harness import container, mounts, scratch, syscalls
from harness.rundir import TAG

TOOLS = ("mkfs.ext4", "mkfs.xfs", "mkfs.btrfs", "losetup", "dmsetup", "fusermount3",
         "setfacl", "getfacl", "emacs", "vim.nox", "brz", "git", "sed", "rsync",
         "qemu-system-x86_64")

OVERLAY_OPTIONS = {
    "volatile": "volatile",
    "metacopy": "metacopy=on,redirect_dir=on,index=on",
    "redirect_dir": "redirect_dir=on",
    "index": "index=on",
    "userxattr": "userxattr",
}


# Where the run finds the modules stackcheck built and loaded for it (a JSON list of
# harness/modules.BuiltModule fields), set by the guest's boot or by the host's loader.
MODULES_MANIFEST_ENV = "STACKCHECK_MODULES"


def kernel_version(release):
    """(major, minor, patch) of a release string such as 6.18.44-foo."""
    parts = []
    for piece in release.split("-")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts + [0] * (3 - len(parts)))


def _errname(exc):
    return errno.errorcode.get(exc.errno, str(exc.errno)) if isinstance(exc, OSError) else type(exc).__name__


@dataclass
class Probe:
    kernel: str
    filesystems: list
    features: dict = field(default_factory=dict)  # name -> {"ok": bool, "detail": str}
    tools: dict = field(default_factory=dict)      # name -> path or None
    modules: list = field(default_factory=list)    # modules under test: built, then as the kernel sees them

    def feature(self, name):
        return self.features.get(name, {}).get("ok", False)

    def reason(self, name):
        """Why a feature is absent, in words a report can show as is."""
        entry = self.features.get(name)
        if entry is None:
            return f"{name}: not probed on this run"
        return entry["detail"]

    def set(self, name, ok, detail=""):
        self.features[name] = {"ok": bool(ok), "detail": detail}

    def to_json(self):
        return json.dumps({"kernel": self.kernel, "filesystems": self.filesystems,
                           "features": self.features, "tools": self.tools, "modules": self.modules}, sort_keys=True)

    @classmethod
    def from_json(cls, text):
        data = json.loads(text)
        return cls(data["kernel"], data["filesystems"], data["features"], data["tools"], data.get("modules", []))

    def module_lines(self):
        """One line per module under test, for every report: where its code came
        from, the file that was built and what the kernel loaded."""
        lines = []
        for m in self.modules:
            patches = "".join(f"; {name} sha256 {digest[:12]}" for name, digest in m.get("patches", ()))
            loaded = (f"loaded srcversion {m['loaded_srcversion']}" if m.get("loaded_srcversion")
                      else "NOT LOADED")
            lines.append(f"{m['name']}: {m['source']}{patches}; source sha256 {m['source_hash'][:12]}; "
                         f"vermagic {m['vermagic'].strip()}; srcversion {m['srcversion']}; {loaded}; taint {m['taint']}")
        return lines

    def table(self):
        """The probe as the text table `./check --probe` prints."""
        lines = [f"kernel        {self.kernel}",
                 f"filesystems   {' '.join(sorted(self.filesystems))}", ""]
        plain = sorted(n for n in self.features if "@" not in n)
        width = max(len(n) for n in self.features) + 2
        for name in plain:
            entry = self.features[name]
            lines.append(f"{name:<{width}}{'yes' if entry['ok'] else 'no ':<5}{entry['detail']}")
        per_fs = sorted({n.split("@")[0] for n in self.features if "@" in n})
        if per_fs:
            lines += ["", f"{'per underlay':<{width}}" + "".join(f"{fs:<8}" for fs in scratch.UNDERLAY_FILESYSTEMS)]
            for name in per_fs:
                cells = []
                for fs in scratch.UNDERLAY_FILESYSTEMS:
                    entry = self.features.get(f"{name}@{fs}")
                    cells.append("-" if entry is None else ("yes" if entry["ok"] else "no"))
                lines.append(f"{name:<{width}}" + "".join(f"{c:<8}" for c in cells))
            reasons = [f"  {n}: {e['detail']}" for n, e in sorted(self.features.items())
                       if "@" in n and not e["ok"]]
            if reasons:
                lines += ["", "why not:"] + reasons
        if self.modules:
            lines += ["", "modules under test"] + [f"  {line}" for line in self.module_lines()]
        lines += ["", "tools"]
        lines += [f"  {name:<22}{path or 'not found'}" for name, path in sorted(self.tools.items())]
        return "\n".join(lines)


def _try_mount(target, fstype, source, options):
    try:
        syscalls.mount(source, target, fstype, 0, options)
    except OSError as e:
        return f"mount -t {fstype} -o {options} failed: {_errname(e)}"
    mounts.unmount(target)
    return None


def _probe_overlay(probe, under, fs):
    base = under.path("probe-overlay")
    dirs = {d: os.path.join(base, d) for d in ("lower", "upper", "work", "merged", "upper2", "work2", "nested")}
    for d in dirs.values():
        os.makedirs(d, exist_ok=True)
    basic = f"lowerdir={dirs['lower']},upperdir={dirs['upper']},workdir={dirs['work']}"
    failed = _try_mount(dirs["merged"], "overlay", TAG, basic)
    probe.set(f"overlay@{fs}", failed is None, failed or "")
    if failed:
        for feature in list(OVERLAY_OPTIONS) + ["nested"]:
            probe.set(f"overlay.{feature}@{fs}", False, f"no overlay on {fs}: {failed}")
        return
    for feature, options in OVERLAY_OPTIONS.items():
        # A fresh upper/work pair per option: index= and volatile leave state in work.
        upper, work = os.path.join(base, f"u-{feature}"), os.path.join(base, f"w-{feature}")
        os.makedirs(upper)
        os.makedirs(work)
        failed = _try_mount(dirs["merged"], "overlay", TAG,
                            f"lowerdir={dirs['lower']},upperdir={upper},workdir={work},{options}")
        probe.set(f"overlay.{feature}@{fs}", failed is None, failed or "")
    # Nested: an overlay whose lower layer is itself an overlay.
    syscalls.mount(TAG, dirs["merged"], "overlay", 0, basic)
    try:
        failed = _try_mount(dirs["nested"], "overlay", TAG,
                            f"lowerdir={dirs['merged']},upperdir={dirs['upper2']},workdir={dirs['work2']}")
    finally:
        mounts.unmount(dirs["merged"])
    probe.set(f"overlay.nested@{fs}", failed is None, failed or "")


def _probe_idmapped(probe, under, fs):
    source = under.path("probe-idmap")
    target = under.path("probe-idmap-target")
    os.makedirs(source, exist_ok=True)
    os.makedirs(target, exist_ok=True)
    name = f"idmapped@{fs}"
    try:
        userns = container.userns_fd()
    except OSError as e:
        probe.set(name, False, f"cannot create a user namespace: {_errname(e)}")
        return
    try:
        tree = syscalls.open_tree(source, syscalls.OPEN_TREE_CLONE | syscalls.OPEN_TREE_CLOEXEC)
        try:
            syscalls.mount_setattr_idmap(tree, userns)
            syscalls.move_mount(tree, target)
            mounts.unmount(target)
            probe.set(name, True)
        finally:
            os.close(tree)
    except OSError as e:
        probe.set(name, False, f"{fs} cannot be idmapped: {e.strerror} ({_errname(e)})")
    finally:
        os.close(userns)


def _probe_user_xattr(probe, under, fs):
    """user.* xattrs on the underlay itself (tmpfs has them only from Linux 6.6)."""
    path = under.path("probe-xattr")
    open(path, "w").close()
    try:
        os.setxattr(path, "user.stackcheck", b"1")
        probe.set(f"user_xattr@{fs}", True)
    except OSError as e:
        probe.set(f"user_xattr@{fs}", False, f"{fs} has no user xattrs here: setxattr user.*: {_errname(e)}")


def _probe_device_mapper(probe):
    try:
        fd = os.open("/dev/mapper/control", os.O_RDWR)
        os.close(fd)
    except OSError as e:
        probe.set("device-mapper", False, f"no device-mapper: /dev/mapper/control: {_errname(e)}")
        return
    targets = ""
    if probe.tools.get("dmsetup"):
        done = subprocess.run(["dmsetup", "targets"], capture_output=True, text=True)
        targets = " ".join(line.split()[0] for line in done.stdout.splitlines() if line.strip())
    probe.set("device-mapper", True, f"targets: {targets}")
    for target in ("error", "linear", "flakey"):
        present = target in targets.split()
        probe.set(f"dm-{target}", present, "" if present else f"device-mapper has no {target} target")


def _probe_pyfuse3(probe):
    try:
        import pyfuse3  # noqa: F401 - only whether it imports
        probe.set("pyfuse3", True, "stackfs can run")
    except ImportError as e:
        probe.set("pyfuse3", False, f"pyfuse3 is not installed: {e}")


def _probe_userns(probe):
    try:
        container.run(os.getuid, idmap=container.CONTAINER_MAP)
        probe.set("userns", True, "container 0..65535 = host 100000..165535")
    except OSError as e:
        probe.set("userns", False, f"cannot create a user namespace: {_errname(e)}")


# The kernel's taint flags by bit (Documentation/admin-guide/tainted-kernels.rst).
TAINT_FLAGS = "PFSRMBUDAWCIOELKXTN"


def taint_text(value):
    """/proc/sys/kernel/tainted as the kernel's own Oops line says it: 12288 (OE)."""
    flags = "".join(flag for bit, flag in enumerate(TAINT_FLAGS) if int(value) >> bit & 1)
    return f"{value} ({flags})" if flags else value


def _modules_under_test():
    """The manifest of built modules, with the kernel's own word on each: the
    srcversion it loaded (proof that it is ours, not the in-tree one) and the
    taint after loading."""
    path = os.environ.get(MODULES_MANIFEST_ENV)
    if not path:
        return []
    with open(path) as f:
        built = json.load(f)
    with open("/proc/sys/kernel/tainted") as f:
        taint = taint_text(f.read().strip())
    for module in built:
        try:
            with open(f"/sys/module/{module['name'].replace('-', '_')}/srcversion") as f:
                module["loaded_srcversion"] = f.read().strip()
        except OSError:
            module["loaded_srcversion"] = ""
        module["taint"] = taint
    return built


def _probe_devices(probe):
    for name, path in (("loop", "/dev/loop-control"), ("fuse", "/dev/fuse")):
        try:
            os.close(os.open(path, os.O_RDWR))
            probe.set(name, True, path)
        except OSError as e:
            probe.set(name, False, f"{path}: {_errname(e)}")
    from harness import zram
    missing = zram.unavailable()
    probe.set("zram", missing is None, missing or zram.CONTROL)
    fusectl = "/sys/fs/fuse/connections"
    ok = mounts.is_mountpoint(fusectl)
    probe.set("fusectl", ok, fusectl if ok else f"fusectl is not mounted at {fusectl}")


def run_probe(workdir, filesystems=scratch.UNDERLAY_FILESYSTEMS):
    """Probe the machine, using workdir (inside the run directory) as scratch."""
    with open("/proc/filesystems") as f:
        fs_list = sorted({line.split()[-1] for line in f if line.strip()})
    probe = Probe(platform.release(), fs_list)
    from harness import stacks  # late: stacks import the probe's neighbours
    stack_programs = [c for v in stacks.variants() for c in stacks.stack_class(v).commands(v)]
    probe.tools = {tool: shutil.which(tool) for tool in (*TOOLS, *stack_programs)}
    probe.set("root", os.geteuid() == 0, "" if os.geteuid() == 0 else "not running as root")
    probe.modules = _modules_under_test()
    _probe_devices(probe)
    _probe_pyfuse3(probe)
    _probe_userns(probe)
    _probe_device_mapper(probe)
    has_shiftfs = "shiftfs" in fs_list
    probe.set("shiftfs", has_shiftfs, "" if has_shiftfs else "kernel has no shiftfs (an Ubuntu-only filesystem)")
    from harness import faults  # late: its backends use the probe's answers above
    backend, why_not = faults.choose(probe)
    probe.set("faults", backend is not None, f"backend {backend.name}" if backend else why_not)
    pool = scratch.ScratchPool(workdir)
    try:
        for fs in filesystems:
            missing = scratch.unavailable(fs, probe)
            if missing:
                for name in ("overlay", "idmapped", "user_xattr") + tuple(
                        f"overlay.{f}" for f in list(OVERLAY_OPTIONS) + ["nested"]):
                    probe.set(f"{name}@{fs}", False, missing)
                continue
            with pool.underlay(fs) as under:
                _probe_overlay(probe, under, fs)
                _probe_idmapped(probe, under, fs)
                _probe_user_xattr(probe, under, fs)
    finally:
        pool.close()
    return probe
