"""./check --kernel SPEC: the selected cases on another kernel, in QEMU.

SPEC is a vmlinuz (with --modules DIR: its lib/modules/<release>), a kernel
.deb, or a Debian package name (fetched with `apt-get download`, unpacked with
dpkg-deb, never installed); or several .deb files, or a directory of them, that
together make one kernel, as Ubuntu ships it (linux-image-unsigned-*,
linux-modules-*, linux-modules-extra-*).  Modules built for the test
(harness/modules.py) are loaded after the kernel's own, a built module named
like one of the kernel's instead of it.  The guest boots a small initramfs of our own:
busybox, and the kernel's own modules for 9p, virtio, loop, overlay, fuse,
device-mapper, ext4, xfs and btrfs, loaded in dependency order.  It mounts
the host's root filesystem read-only over 9p (so the project and its venv
run as they are), the host's results directory read-write, tmpfs for the
scratch, and runs harness.cli there; the results land in a section named
after the guest's kernel release.  KVM when /dev/kvm works, TCG otherwise.

Measured on the project's machines (TCG, 2 cores): Debian's 6.1 kernel boots
to the first case in about 3 s.  A guest that panics, hangs or loses its
console ends with exit status 2, its console saved as console.log; QEMU
never outlives the run.
"""

import hashlib
import itertools
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import time
import dataclasses
from dataclasses import dataclass

from harness import container, probe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "stackcheck", "kernels")
# crc32c first: libcrc32c, ext4's metadata checksums, xfs and btrfs need the
# algorithm, which modinfo names only as a soft dependency.
MODULES = ("crc32c_generic", "virtio_pci", "9pnet_virtio", "9p", "loop", "overlay", "fuse", "dm-mod", "dm-flakey", "dm-delay",
           "ext4", "xfs", "btrfs", "zram")
BUSYBOX = "/bin/busybox"
PACKAGES = {"qemu-system-x86_64": "qemu-system-x86", BUSYBOX: "busybox-static"}


class GuestError(RuntimeError):
    """The guest could not boot or did not finish: exit status 2."""


def _say(message):
    print(f"stackcheck: {message}", file=sys.stderr, flush=True)


_apt_updated = []


def _apt_update():
    """apt-get update once per run: a fresh machine may have no package lists."""
    if not _apt_updated:
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
        _apt_updated.append(True)


def ensure_tools():
    missing = sorted({pkg for tool, pkg in PACKAGES.items()
                      if not (os.path.exists(tool) if tool.startswith("/") else shutil.which(tool))})
    if missing:
        _apt_update()
        _say(f"installing Debian packages: {' '.join(missing)}")
        done = subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
                              env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"), capture_output=True, text=True)
        if done.returncode:
            raise GuestError(f"cannot install {' '.join(missing)}: {done.stderr.strip()[-300:]}")


# -- the kernel ------------------------------------------------------------------------
@dataclass(frozen=True)
class Kernel:
    vmlinuz: str
    modules_dir: str   # lib/modules/<release>
    release: str
    version: str = ""  # the image package's Debian version, when it came as a package


def _unpack_debs(debs):
    """Unpack one or more .deb files into one tree of the cache (a kernel split over
    several packages becomes whole there); the tree's path."""
    names = sorted(os.path.basename(d)[:-4] for d in debs)
    key = names[0] if len(names) == 1 else "split-" + hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]
    target = os.path.join(CACHE, key)
    done = os.path.join(target, ".stackcheck-unpacked")
    if not os.path.exists(done):
        os.makedirs(target, exist_ok=True)
        for deb in debs:
            subprocess.run(["dpkg-deb", "-x", deb, target], check=True)
        open(done, "w").close()
    return target


def _deb_version(deb):
    return subprocess.run(["dpkg-deb", "-f", deb, "Version"], capture_output=True, text=True).stdout.strip()


def _download(package):
    """apt-get download a kernel package (a metapackage's image dependency); its .deb path."""
    depends = subprocess.run(["apt-cache", "depends", package], capture_output=True, text=True).stdout
    if not depends:
        _apt_update()
        depends = subprocess.run(["apt-cache", "depends", package], capture_output=True, text=True).stdout
    image = re.findall(r"Depends: (linux-image-[^\s]+)", depends)
    name = image[0] if image and not re.match(r"linux-image-\d", package) else package
    os.makedirs(CACHE, exist_ok=True)
    found = [f for f in os.listdir(CACHE) if f.startswith(name + "_") and f.endswith(".deb")]
    if not found:
        _say(f"fetching {name} with apt-get download")
        done = subprocess.run(["apt-get", "download", name], cwd=CACHE, capture_output=True, text=True)
        found = [f for f in os.listdir(CACHE) if f.startswith(name + "_") and f.endswith(".deb")]
        if not found:
            raise GuestError(f"apt-get download {name} failed: {done.stderr.strip()[-300:]}")
    return os.path.join(CACHE, sorted(found)[-1])


def _debs(specs):
    """The .deb files that SPECs name: files, directories of them, a package name."""
    debs = []
    for spec in specs:
        if os.path.isdir(spec):
            found = sorted(os.path.join(spec, f) for f in os.listdir(spec) if f.endswith(".deb"))
            if not found:
                raise GuestError(f"{spec}: a directory with no .deb file")
            debs += found
        elif spec.endswith(".deb"):
            if not os.path.isfile(spec):
                raise GuestError(f"{spec}: no such file")
            debs.append(spec)
        elif len(specs) == 1:
            debs.append(_download(spec))
        else:
            raise GuestError(f"{spec}: with several --kernel, each must be a .deb file or a directory of them")
    return debs


def resolve_kernel(specs, modules=None):
    """The Kernel that SPECs (one or more --kernel values) name."""
    specs = [specs] if isinstance(specs, str) else list(specs)
    if len(specs) == 1 and os.path.isfile(specs[0]) and not specs[0].endswith(".deb"):
        if not modules:
            raise GuestError("--kernel VMLINUZ needs --modules DIR (the kernel's lib/modules/<release>)")
        return Kernel(specs[0], modules, os.path.basename(os.path.normpath(modules)))
    debs = _debs(specs)
    root = _unpack_debs(debs)
    what = " ".join(specs)
    releases = os.listdir(os.path.join(root, "lib", "modules")) if os.path.isdir(os.path.join(root, "lib", "modules")) else []
    if len(releases) != 1:
        raise GuestError(f"{what}: expected one kernel release in the packages, found {releases or 'none'}")
    release = releases[0]
    vmlinuz = os.path.join(root, "boot", f"vmlinuz-{release}")
    if not os.path.isfile(vmlinuz):
        raise GuestError(f"{what}: no boot/vmlinuz-{release} in the packages (the image package is missing)")
    # The image's own package: the one that holds the vmlinuz.
    image = debs[0] if len(debs) == 1 else next((d for d in debs if f"./boot/vmlinuz-{release}" in subprocess.run(
        ["dpkg-deb", "-c", d], capture_output=True, text=True).stdout), debs[0])
    return Kernel(vmlinuz, os.path.join(root, "lib", "modules", release), release, _deb_version(image))


def _module_files(modules_dir):
    files = {}
    for directory, _, names in os.walk(modules_dir):
        for name in names:
            if name.endswith(".ko"):
                files[name[:-3].replace("-", "_")] = os.path.join(directory, name)
    return files


def _depends(path):
    with open(path, "rb") as f:
        found = re.search(rb"depends=([^\0]*)\0", f.read())
    return [d.replace("-", "_") for d in found.group(1).decode().split(",") if d] if found else []


def _builtin(modules_dir):
    try:
        with open(os.path.join(modules_dir, "modules.builtin")) as f:
            return {os.path.basename(line.strip())[:-3].replace("-", "_") for line in f}
    except OSError:
        return set()


def module_load_order(modules_dir, wanted=MODULES, built=()):
    """The .ko files for wanted and everything they depend on, dependencies first,
    then the built modules (harness/modules.BuiltModule) after what they depend on.
    A built module named like one of the kernel's is loaded instead of it, in its
    place.  Read from each module's own .modinfo: the unpacked package has no
    modules.dep."""
    files = _module_files(modules_dir)
    in_kernel = _builtin(modules_dir)
    for module in built:
        name = module.name.replace("-", "_")
        if name in in_kernel:
            raise GuestError(f"{module.name} is built into {os.path.basename(modules_dir)}: "
                             f"a module of that name cannot replace it")
        files[name] = module.path
    order, seen = [], set()

    def visit(name):
        name = name.replace("-", "_")
        if name in seen or name not in files:  # not a module: built in
            return
        seen.add(name)
        for dep in _depends(files[name]):
            visit(dep)
        order.append(files[name])
    for name in [*wanted, *(m.name for m in built)]:
        visit(name)
    return order


# -- the initramfs --------------------------------------------------------------------------
_inode_numbers = itertools.count(1)


def _cpio_entry(out, name, mode, data=b""):
    """One entry of a newc cpio archive (what the kernel unpacks as an initramfs)."""
    name_bytes = name.encode() + b"\0"
    fields = [next(_inode_numbers), mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name_bytes), 0]
    out.write(b"070701" + b"".join(b"%08X" % f for f in fields) + name_bytes)
    out.write(b"\0" * (-(110 + len(name_bytes)) % 4))
    out.write(data)
    out.write(b"\0" * (-len(data) % 4))


INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mkdir -p /dev/pts; mount -t devpts -o ptmxmode=0666 devpts /dev/pts  # ptys for the real clients (pexpect)
ip link set lo up  # pytest-xdist and pytest-rerunfailures talk over loopback
for m in $(cat /modules.order); do insmod "/modules/$m" || echo "stackcheck-guest: insmod $m failed"; done
mkdir -p /host
if ! mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose hostroot /host; then
    echo "stackcheck-guest: cannot mount the host's root over 9p"; poweroff -f
fi
mount -t 9p -o trans=virtio,version=9p2000.L,cache=none results /host/mnt
for d in tmp run var/tmp; do mount -t tmpfs -o mode=1777 tmpfs /host/$d; done
# the project itself, at its own path: it may live under a /tmp the guest hides
mkdir -p /host@ROOT@ 2>/dev/null
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose project /host@ROOT@
for d in dev proc sys; do mount --move /$d /host/$d; done
echo "stackcheck-guest: kernel $(uname -r) up; running the cases"
# switch_root, not chroot: unshare(CLONE_NEWUSER) refuses a chrooted caller (EPERM)
exec switch_root /host /bin/sh /mnt/.guest-run.sh
"""


def build_initramfs(path, modules):
    with open(path, "wb") as out:
        for d in ("bin", "dev", "proc", "sys", "modules", "host"):
            _cpio_entry(out, d, stat.S_IFDIR | 0o755)
        with open(BUSYBOX, "rb") as f:
            _cpio_entry(out, "bin/busybox", stat.S_IFREG | 0o755, f.read())
        _cpio_entry(out, "init", stat.S_IFREG | 0o755, INIT.replace("@ROOT@", shlex.quote(ROOT)).encode())
        names = []
        for module in modules:
            with open(module, "rb") as f:
                _cpio_entry(out, f"modules/{os.path.basename(module)}", stat.S_IFREG | 0o644, f.read())
            names.append(os.path.basename(module))
        _cpio_entry(out, "modules.order", stat.S_IFREG | 0o644, ("\n".join(names) + "\n").encode())
        _cpio_entry(out, "TRAILER!!!", 0)


# -- the run ------------------------------------------------------------------------------
ACCELS = {"kvm": ["-accel", "kvm", "-cpu", "host"], "tcg": ["-accel", "tcg,thread=multi"]}


def _accel():
    """KVM when it can run a vCPU here, else TCG.  /dev/kvm can exist without it:
    with no nested virtualisation the CPU has no vmx/svm flag."""
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR))
        with open("/proc/cpuinfo") as f:
            usable = bool(re.search(r"^flags\s*:.*\b(vmx|svm)\b", f.read(), re.M))
    except OSError:
        usable = False
    name = "kvm" if usable else "tcg"
    return name, ACCELS[name]


MANIFEST = ".guest-modules.json"  # in the results directory: the built modules, for the guest's probe


def run(kernel, cli_args, results_dir, workdir, built=(), timeout=3600, append=""):
    """Boot the Kernel (resolve_kernel) with the built modules loaded, run ./check's
    cli_args inside; returns the guest run's exit status."""
    ensure_tools()
    release = kernel.release
    section_dir = os.path.join(results_dir, release)
    os.makedirs(section_dir, exist_ok=True)
    initrd = os.path.join(workdir, "initrd.cpio")
    build_initramfs(initrd, module_load_order(kernel.modules_dir, built=built))
    vmlinuz = kernel.vmlinuz
    exit_file = os.path.join(results_dir, ".guest-exit")
    if os.path.exists(exit_file):
        os.unlink(exit_file)
    with open(os.path.join(results_dir, MANIFEST), "w") as f:
        json.dump([dataclasses.asdict(m) for m in built], f)
    inner = ["env", f"PYTHONPATH={ROOT}", "PYTHONDONTWRITEBYTECODE=1", "CI=true", "HOME=/tmp",
             f"{probe.MODULES_MANIFEST_ENV}=/mnt/{MANIFEST}",
             "PATH=/usr/local/sbin:/usr/sbin:/sbin:/usr/local/bin:/usr/bin:/bin",
             os.path.join(ROOT, ".venv", "bin", "python"), "-m", "harness.cli", "--results", "/mnt", *cli_args]
    with open(os.path.join(results_dir, ".guest-run.sh"), "w") as f:
        f.write(f"cd {shlex.quote(ROOT)}\n{shlex.join(inner)}\necho $? > /mnt/.guest-exit\nsync\n"
                # the script is PID 1: power off now, before it exits (that would panic)
                f"{shlex.quote(sys.executable)} -c 'import ctypes; ctypes.CDLL(None).reboot(0x4321fedc)'\n")
    accel, accel_args = _accel()
    qemu = ["qemu-system-x86_64", *accel_args, "-m", "4096", "-smp", "2", "-nographic", "-no-reboot",
            "-kernel", vmlinuz, "-initrd", initrd,
            "-append", f"console=ttyS0 quiet loglevel=3 panic=-1 {append}".strip(),
            "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
            "-virtfs", f"local,path={os.path.realpath(results_dir)},mount_tag=results,security_model=none",
            "-virtfs", f"local,path={ROOT},mount_tag=project,security_model=none,readonly=on"]
    _say(f"booting {release} under QEMU ({accel}); console in {os.path.relpath(section_dir)}/console.log")
    started = time.monotonic()
    console_path = os.path.join(section_dir, "console.log")
    first_case = None
    with open(console_path, "wb") as console:
        # QEMU never outlives the run, even one killed with SIGKILL.
        proc = subprocess.Popen(qemu, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                preexec_fn=container.die_with_parent)
        try:
            for line in _lines(proc, started + timeout):
                console.write(line)
                console.flush()
                text = line.decode(errors="replace").rstrip("\r\n")
                if first_case is None and "stackcheck-guest: kernel" in text:
                    first_case = time.monotonic() - started
                sys.stdout.write(text + "\n")
                sys.stdout.flush()
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    elapsed = time.monotonic() - started
    try:
        with open(exit_file) as f:
            status = int(f.read().strip())
        os.unlink(exit_file)
    except (OSError, ValueError):
        reason = "timed out" if elapsed >= timeout else "stopped before the cases finished"
        raise GuestError(f"the guest ({release}) {reason} after {elapsed:.0f} s; its console: {console_path}") from None
    finally:
        for name in (".guest-run.sh", MANIFEST):
            if os.path.exists(os.path.join(results_dir, name)):
                os.unlink(os.path.join(results_dir, name))
    _say(f"guest {release}: booted to the first case in {first_case or 0:.1f} s, ran in {elapsed:.1f} s")
    return status


def _lines(proc, deadline):
    """QEMU's output line by line, until it exits or the deadline passes."""
    import select
    buffer = b""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        ready, _, _ = select.select([proc.stdout], [], [], remaining)
        if not ready:
            return
        chunk = os.read(proc.stdout.fileno(), 65536)
        if not chunk:
            if buffer:
                yield buffer
            return
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            yield line + b"\n"
