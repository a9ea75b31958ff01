"""./check --kernel SPEC: the selected cases on another kernel, in QEMU.

SPEC is a vmlinuz (with --modules DIR: its lib/modules/<release>), a kernel
.deb, or a Debian package name (fetched with `apt-get download`, unpacked with
dpkg-deb, never installed).  The guest boots a small initramfs of our own:
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

import itertools
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "stackcheck", "kernels")
# crc32c first: libcrc32c, ext4's metadata checksums, xfs and btrfs need the
# algorithm, which modinfo names only as a soft dependency.
MODULES = ("crc32c_generic", "virtio_pci", "9pnet_virtio", "9p", "loop", "overlay", "fuse", "dm-mod", "dm-flakey", "dm-delay",
           "ext4", "xfs", "btrfs")
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
def _unpack_deb(deb):
    target = os.path.join(CACHE, os.path.basename(deb)[:-4])
    if not os.path.isdir(os.path.join(target, "lib", "modules")):
        os.makedirs(target, exist_ok=True)
        subprocess.run(["dpkg-deb", "-x", deb, target], check=True)
    return target


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


def resolve_kernel(spec, modules=None):
    """(vmlinuz, modules dir lib/modules/<release>, release) for a SPEC."""
    if os.path.isfile(spec) and not spec.endswith(".deb"):
        if not modules:
            raise GuestError("--kernel VMLINUZ needs --modules DIR (the kernel's lib/modules/<release>)")
        return spec, modules, os.path.basename(os.path.normpath(modules))
    root = _unpack_deb(spec if spec.endswith(".deb") else _download(spec))
    releases = os.listdir(os.path.join(root, "lib", "modules"))
    if len(releases) != 1:
        raise GuestError(f"{spec}: expected one kernel release in the package, found {releases}")
    release = releases[0]
    vmlinuz = os.path.join(root, "boot", f"vmlinuz-{release}")
    return vmlinuz, os.path.join(root, "lib", "modules", release), release


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


def module_load_order(modules_dir, wanted=MODULES):
    """The .ko files for wanted and everything they depend on, dependencies first.
    Read from each module's own .modinfo: the unpacked package has no modules.dep."""
    files = _module_files(modules_dir)
    order, seen = [], set()

    def visit(name):
        name = name.replace("-", "_")
        if name in seen or name not in files:  # not a module: built in
            return
        seen.add(name)
        for dep in _depends(files[name]):
            visit(dep)
        order.append(files[name])
    for name in wanted:
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


def run(spec, cli_args, results_dir, workdir, modules=None, timeout=3600, append=""):
    """Boot the kernel, run ./check's cli_args inside; returns the guest run's exit status."""
    ensure_tools()
    vmlinuz, modules_dir, release = resolve_kernel(spec, modules)
    section_dir = os.path.join(results_dir, release)
    os.makedirs(section_dir, exist_ok=True)
    initrd = os.path.join(workdir, "initrd.cpio")
    build_initramfs(initrd, module_load_order(modules_dir))
    exit_file = os.path.join(results_dir, ".guest-exit")
    if os.path.exists(exit_file):
        os.unlink(exit_file)
    inner = ["env", f"PYTHONPATH={ROOT}", "PYTHONDONTWRITEBYTECODE=1", "CI=true", "HOME=/tmp",
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
        proc = subprocess.Popen(qemu, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
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
        if os.path.exists(os.path.join(results_dir, ".guest-run.sh")):
            os.unlink(os.path.join(results_dir, ".guest-run.sh"))
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
