"""./check --kernel SPEC: the selected cases on another kernel, in QEMU.

SPEC is a vmlinuz (with --modules DIR: its lib/modules/<release>), a kernel
.deb, or a Debian package name; or several .deb files, or a directory of them,
that together make one kernel, as Ubuntu ships it (linux-image-unsigned-*,
linux-modules-*, linux-modules-extra-*).  A package name means the archive's
current version (linux-image-amd64: the image it depends on now), fetched with
`apt-get download` into the cache unless there, unpacked with dpkg-deb, never
installed; when the archive does not answer, the newest cached kernel that has
all the run needs (headers for --module), said in one line and at the head of
console.log.

Modules built for the test (harness/modules.py) are loaded after the kernel's
own, a built module named like one of the kernel's instead of it.  The guest
boots a small initramfs of our own: busybox, and the kernel's own modules for
9p, virtio, loop, overlay, fuse, device-mapper, ext4, xfs and btrfs, loaded in
dependency order.  It mounts the host's root filesystem read-only over 9p (so
the project, its venv and stackcheck's cache are there as they are), the host's
results directory read-write at its own path, tmpfs for the scratch, and runs
harness.cli there, in the host's working directory; the results land in a
section named after the guest's kernel release.  KVM when /dev/kvm works, TCG otherwise.

Measured on the project's machines (TCG, 2 cores): Debian's 6.1 kernel boots
to the first case in about 3 s.  The terminal shows the guest's run, with this
machine's paths; the firmware, the boot and the shutdown are in console.log.  A
guest that panics, hangs or loses its console ends with exit status 2, its
console saved as console.log; QEMU never outlives the run.
"""

import contextlib
import functools
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
import tempfile
import time
import urllib.parse
import dataclasses
from dataclasses import dataclass

from harness import archive, container, probe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE_HOME = os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))
CACHE = os.path.join(CACHE_HOME, "stackcheck", "kernels")
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


def ensure_tools():
    missing = sorted({pkg for tool, pkg in PACKAGES.items()
                      if not (os.path.exists(tool) if tool.startswith("/") else shutil.which(tool))})
    if missing:
        _say(f"installing Debian packages: {' '.join(missing)}")
        try:
            archive.install(missing)
        except archive.ArchiveError as e:
            raise GuestError(str(e)) from None


# -- the kernel ------------------------------------------------------------------------
@dataclass(frozen=True)
class Kernel:
    vmlinuz: str
    modules_dir: str   # lib/modules/<release>
    release: str
    version: str = ""  # the image package's Debian version, when it came as a package
    package: str = ""  # the image package's name, when it came as a package
    origin: str = ""   # why it is not what was asked for exactly (an older kernel from the cache)

    def describe(self):
        what = f"{self.package} {self.version}" if self.package else self.vmlinuz
        return what + (f" ({self.origin})" if self.origin else "")


def _unpack_debs(debs):
    """Unpack one or more .deb files into one tree of the cache (a kernel split over
    several packages becomes whole there); the tree's path."""
    names = sorted(os.path.basename(d)[:-4] for d in debs)
    key = names[0] if len(names) == 1 else "split-" + hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]
    target = os.path.join(CACHE, key)
    if not os.path.isdir(target):
        # Unpacked aside and renamed into place: runs side by side never see half a tree.
        staging = tempfile.mkdtemp(dir=CACHE, prefix=".unpack-")
        try:
            for deb in debs:
                subprocess.run(["dpkg-deb", "-x", deb, staging], check=True)
            os.chmod(staging, 0o755)
            with contextlib.suppress(OSError):  # another run unpacked it first
                os.rename(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _deb_field(deb, field):
    return subprocess.run(["dpkg-deb", "-f", deb, field], capture_output=True, text=True).stdout.strip()


# A versioned image package (linux-image-6.1.0-57-amd64), as opposed to a metapackage
# (linux-image-amd64) that names the archive's current one in its Depends.
IMAGE = re.compile(r"linux-image-\d")


def _image_of(package):
    """(image package, version) that package names in the archive now."""
    record = archive.candidate(package)
    image = re.search(r"\b(linux-image-\d[^\s,(]*)", record.get("Depends", ""))
    if image and not IMAGE.match(package):
        package = image.group(1)
        record = archive.candidate(package)
    if not record.get("Version"):
        raise archive.ArchiveError(f"Debian's archive has no {package}")
    return package, record["Version"]


def _deb_name(deb):
    """(package, version) of a .deb named as apt-get download names it."""
    package, version, _ = os.path.basename(deb)[:-len(".deb")].split("_")
    return package, urllib.parse.unquote(version)


def _cached_deb(package, version):
    name = f"{package}_{version.replace(':', '%3a')}_"
    found = [f for f in os.listdir(CACHE) if f.startswith(name) and f.endswith(".deb")]
    return os.path.join(CACHE, found[0]) if found else None


def _compare_versions(a, b):
    if a == b:
        return 0
    return 1 if subprocess.run(["dpkg", "--compare-versions", a, "gt", b]).returncode == 0 else -1


def _cached_images(package):
    """The cached .debs that package names, newest first: of the package itself, or
    for a metapackage (linux-image-amd64) of every image of its flavour
    (linux-image-6.1.0-57-amd64)."""
    name = re.escape(package)
    if package.startswith("linux-image-") and not IMAGE.match(package):
        name = r"linux-image-\d[\d.]*-\d+-" + re.escape(package[len("linux-image-"):])
    debs = [os.path.join(CACHE, f) for f in os.listdir(CACHE) if re.fullmatch(name + r"_[^_]+_[^_]+\.deb", f)]
    return sorted(debs, key=functools.cmp_to_key(lambda a, b: _compare_versions(_deb_name(a)[1], _deb_name(b)[1])),
                  reverse=True)


def _package_deb(package, complete):
    """(.deb, origin) of the kernel image that package names: the archive's current
    version, fetched into the cache unless it is there; when the archive cannot give
    it, the newest cached image for which complete(release, version) holds (what else
    the run needs is cached too), said in one line and in its origin."""
    os.makedirs(CACHE, exist_ok=True)
    stale_lists = archive.update()
    try:
        name, version = _image_of(package)
        deb = _cached_deb(name, version)
        if not deb:
            _say(f"fetching {name} {version} with apt-get download")
            deb = archive.download(name, version, CACHE)
        return deb, ""
    except archive.ArchiveError as e:
        why = str(e) + (f"; {stale_lists}" if stale_lists else "")
    cached = [(deb, *_deb_name(deb)) for deb in _cached_images(package)]
    for deb, name, version in cached:
        if complete(name[len("linux-image-"):], version):
            _say(f"{why}: using the cached {name} {version}, the newest complete kernel in {CACHE}")
            return deb, f"from the cache: {why}"
    lacking = f" ({', '.join(f'{n} {v}' for _, n, v in cached)} without all the run needs)" if cached else ""
    raise GuestError(f"{why}; {CACHE} holds no {package} to fall back on{lacking}")


def _debs(specs, complete):
    """(the .deb files that SPECs name: files, directories of them, a package name;
    the origin of a package's)."""
    debs, origin = [], ""
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
            deb, origin = _package_deb(spec, complete)
            debs.append(deb)
        else:
            raise GuestError(f"{spec}: with several --kernel, each must be a .deb file or a directory of them")
    return debs, origin


def resolve_kernel(specs, modules=None, complete=lambda release, version: True):
    """The Kernel that SPECs (one or more --kernel values) name.  complete(release,
    version): whether the cache holds all the run needs for that kernel besides
    its image (headers for --module), for when the archive does not answer."""
    specs = [specs] if isinstance(specs, str) else list(specs)
    if len(specs) == 1 and os.path.isfile(specs[0]) and not specs[0].endswith(".deb"):
        if not modules:
            raise GuestError("--kernel VMLINUZ needs --modules DIR (the kernel's lib/modules/<release>)")
        return Kernel(specs[0], modules, os.path.basename(os.path.normpath(modules)))
    debs, origin = _debs(specs, complete)
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
    return Kernel(vmlinuz, os.path.join(root, "lib", "modules", release), release, _deb_field(image, "Version"),
                  _deb_field(image, "Package"), origin)


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
# The guest's own run, on its console between these two lines, is what the user sees;
# the firmware's screen (SeaBIOS, iPXE: escape sequences that clear it and turn off line
# wrap), the boot and the shutdown stay in console.log.
RUN_STARTS = "stackcheck-guest: kernel"
RUN_ENDS = "stackcheck-guest: the run ended"
GUEST_LINE = "stackcheck-guest:"  # what the initramfs says about its own failures: shown too
ESCAPES = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|[ -/]*[0-~])")


def _guest_script(cli_args, results_dir):
    """The script the guest runs as PID 1: ./check's cli_args in this directory, with
    the results directory at its own path, so that every path the run prints is this
    machine's; then the exit status and the modules left loaded, for console.log."""
    q = shlex.quote
    inner = ["env", f"PYTHONPATH={ROOT}", "PYTHONDONTWRITEBYTECODE=1", "CI=true", "HOME=/tmp",
             f"XDG_CACHE_HOME={CACHE_HOME}",  # stackcheck's cache, read-only: modules built here are hits
             f"{probe.MODULES_MANIFEST_ENV}=/mnt/{MANIFEST}",
             "PATH=/usr/local/sbin:/usr/sbin:/sbin:/usr/local/bin:/usr/bin:/bin",
             os.path.join(ROOT, ".venv", "bin", "python"), "-m", "harness.cli", "--results", results_dir, *cli_args]
    return (f"mkdir -p {q(results_dir)} 2>/dev/null; mount --bind /mnt {q(results_dir)}\n"
            f"mkdir -p {q(os.getcwd())} 2>/dev/null; cd {q(os.getcwd())}\n"
            f"{shlex.join(inner)}\nstatus=$?\necho $status > /mnt/.guest-exit\n"
            f"echo \"{RUN_ENDS} (exit status $status); modules loaded:\" $(cut -d' ' -f1 /proc/modules | sort)\n"
            "sync\n"
            # the script is PID 1: power off now, before it exits (that would panic)
            f"{q(sys.executable)} -c 'import ctypes; ctypes.CDLL(None).reboot(0x4321fedc)'\n")


def run(kernel, cli_args, results_dir, workdir, built=(), timeout=3600, append=""):
    """Boot the Kernel (resolve_kernel) with the built modules loaded, run ./check's
    cli_args inside; returns the guest run's exit status.  results_dir: absolute."""
    ensure_tools()
    release = kernel.release
    section_dir = os.path.join(results_dir, release)
    os.makedirs(section_dir, exist_ok=True)
    initrd = os.path.join(workdir, "initrd.cpio")
    build_initramfs(initrd, module_load_order(kernel.modules_dir, built=built))
    exit_file = os.path.join(results_dir, ".guest-exit")
    if os.path.exists(exit_file):
        os.unlink(exit_file)
    with open(os.path.join(results_dir, MANIFEST), "w") as f:
        json.dump([dataclasses.asdict(m) for m in built], f)
    with open(os.path.join(results_dir, ".guest-run.sh"), "w") as f:
        f.write(_guest_script(cli_args, results_dir))
    accel, accel_args = _accel()
    qemu = ["qemu-system-x86_64", *accel_args, "-m", "4096", "-smp", "2", "-nographic", "-no-reboot",
            "-kernel", kernel.vmlinuz, "-initrd", initrd,
            "-append", f"console=ttyS0 quiet loglevel=3 panic=-1 {append}".strip(),
            "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
            "-virtfs", f"local,path={os.path.realpath(results_dir)},mount_tag=results,security_model=none",
            "-virtfs", f"local,path={ROOT},mount_tag=project,security_model=none,readonly=on"]
    started = time.monotonic()
    console_path = os.path.join(section_dir, "console.log")
    with open(console_path, "wb") as console:
        console.write(f"stackcheck: booting {kernel.describe()}\n".encode())
        # QEMU never outlives the run, even one killed with SIGKILL.
        proc = subprocess.Popen(qemu, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                preexec_fn=container.die_with_parent)
        _say(f"booting {release} under QEMU ({accel}); console in {console_path}")
        try:
            first_case, last = _show_console(proc, console, started, started + timeout)
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
        raise GuestError(f"the guest ({release}) {reason} after {elapsed:.0f} s (its console's last line: "
                         f"{last[-200:]!r}); its console: {console_path}") from None
    finally:
        for name in (".guest-run.sh", MANIFEST):
            if os.path.exists(os.path.join(results_dir, name)):
                os.unlink(os.path.join(results_dir, name))
    _say(f"guest {release}: booted to the first case in {first_case or 0:.1f} s, ran in {elapsed:.1f} s")
    return status


def _show_console(proc, console, started, deadline):
    """Copy QEMU's output into console; show the guest's run (and its own
    complaints) on stdout, without terminal control sequences.  (Seconds to the
    first case or None, the last line.)"""
    first_case, showing, last = None, False, ""
    for line in _lines(proc, deadline):
        console.write(line)
        console.flush()
        text = ESCAPES.sub("", line.decode(errors="replace")).rstrip("\r\n")
        last = text.strip() or last
        if RUN_STARTS in text and first_case is None:
            first_case, showing = time.monotonic() - started, True
            text = text[text.index(RUN_STARTS):]  # the firmware's last words share its line
        elif RUN_ENDS in text:
            showing = False
        if showing or GUEST_LINE in text and first_case is None:
            sys.stdout.write(text + "\n")
            sys.stdout.flush()
    return first_case, last


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
