"""--module SRC: kernel modules built from source for the kernel under test.

SRC is one of
  DIR                a DKMS tree (DIR/dkms.conf, honoured as DKMS reads it) or a
                     plain Kbuild directory (a Kbuild file, or a Makefile with obj-m):
                     `make -C KDIR M=DIR modules`;
  linux-source:PATH  PATH of the target kernel's own source (`linux-source:fs/overlayfs`),
                     from Debian's linux-source-X.Y of exactly the image's version;
and either may end in +PATCH[+PATCH...]: patch files applied in order with
`patch -p1` at the tree's root (the kernel source's root for linux-source).

Modules are built on this machine against the target kernel's headers: Debian's
linux-headers-<release> (with its -common part and linux-kbuild-X.Y) of the
image's version, fetched with apt-get download and unpacked into our cache,
never installed; for the running kernel /lib/modules/<release>/build when it
is there.  A build is made in a copy of the source (the tree may be read-only)
and cached by (the source's content and patches, the kernel release): the same
inputs again run no make.

Every command's output goes to the run's log; what fails is one ModuleError line.
"""

import contextlib
import fcntl
import gzip
import hashlib
import json
import lzma
import os
import re
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass

from harness import archive

CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                     "stackcheck", "modules")
# Builds apart from the packages: tests and the benchmark keep theirs in scratch,
# and still share the 150 MB of headers and source.
BUILDS = os.path.join(CACHE, "builds")
# Bumped when the way a build is made changes, so that older cache entries miss.
BUILDER = 2
LINUX_SOURCE = "linux-source:"
# Kbuild's products: a tree someone built by hand hashes and copies as its source.
BUILD_PRODUCTS = re.compile(r"\.(o|ko|mod|mod\.c|cmd|a|order|symvers|dwo|tmp)$|^(\.tmp_versions|\.git)$")
# Host tools a build needs, by the Debian package that has them.
TOOLS = {"make": "make", "patch": "patch", "xz": "xz-utils", "tar": "tar", "dpkg-deb": "dpkg", "bash": "bash"}
LOADING_TOOLS = {"insmod": "kmod", "rmmod": "kmod", "modprobe": "kmod"}
RELEASE = re.compile(r"^[\w.+~-]+$")


class ModuleError(Exception):
    """One clear line; the CLI prints it and exits 2."""


@dataclass(frozen=True)
class ModuleSource:
    """A parsed, validated --module SRC."""
    spec: str
    kind: str            # "dkms" | "kbuild" | "linux-source"
    path: str            # dkms, kbuild: the tree, absolute; linux-source: the subtree, from the source root
    patches: tuple = ()  # absolute paths of the patch files, in the order they apply


@dataclass(frozen=True)
class BuiltModule:
    name: str         # as the kernel knows it ("shiftfs", "overlay"): .modinfo's name=
    path: str         # the .ko in the cache
    source: str       # for people: "<abs path> (dkms shiftfs)",
    #                   "linux-source-6.1 6.1.192-3: fs/overlayfs + fix.patch"
    source_hash: str  # sha256 over the tree's content and the patches
    patches: tuple    # ((file name, sha256), ...)
    vermagic: str
    srcversion: str
    depends: tuple
    release: str


# -- parsing SRC ---------------------------------------------------------------------------
def parse(spec):
    """The ModuleSource for --module SPEC, checked without building anything."""
    if spec.startswith(LINUX_SOURCE):
        subtree, *patches = spec[len(LINUX_SOURCE):].split("+")
        subtree = os.path.normpath(subtree) if subtree else ""
        if not subtree or subtree in (".", "..") or os.path.isabs(subtree) or subtree.startswith("../"):
            raise ModuleError(f"--module {spec}: give a directory of the kernel's source, "
                              "as linux-source:fs/overlayfs")
        patches = _patch_files(spec, patches, inside=subtree)
        return ModuleSource(spec, "linux-source", subtree, patches)
    # A directory's own name may hold a "+": the whole SPEC is tried as a path first.
    tree, *patches = [spec] if os.path.isdir(spec) else spec.split("+")
    if not os.path.isdir(tree):
        raise ModuleError(f"--module {spec}: no such directory: {tree}")
    tree = os.path.abspath(tree)
    patches = _patch_files(spec, patches, inside="")
    return ModuleSource(spec, _tree_kind(spec, tree), tree, patches)


def _tree_kind(spec, tree):
    conf = os.path.join(tree, "dkms.conf")
    if os.path.exists(conf):
        if not os.access(conf, os.R_OK):
            raise ModuleError(f"--module {spec}: {conf} is not readable")
        return "dkms"
    if os.path.isfile(os.path.join(tree, "Kbuild")):
        return "kbuild"
    makefile = os.path.join(tree, "Makefile")
    if os.path.isfile(makefile):
        with open(makefile, errors="replace") as f:
            if re.search(r"^\s*obj-m\s*[:+]?=", f.read(), re.M):
                return "kbuild"
    raise ModuleError(f"--module {spec}: {tree} is not a module source tree (no dkms.conf, no Kbuild, "
                      "no Makefile with obj-m)")


def _patch_files(spec, names, inside):
    """Absolute paths of the patches, each readable and touching only files under inside."""
    paths = []
    for name in names:
        if not name:
            raise ModuleError(f"--module {spec}: an empty patch name (two '+' in a row?)")
        path = os.path.abspath(name)
        try:
            with open(path, errors="replace") as f:
                text = f.read()
        except OSError as e:
            raise ModuleError(f"--module {spec}: patch {name}: {e.strerror}") from None
        touched = patched_files(text)
        if not touched:
            raise ModuleError(f"--module {spec}: {name} is not a patch (no ---/+++ file lines)")
        for file in touched:
            if file.startswith("../") or os.path.isabs(file):
                raise ModuleError(f"--module {spec}: {name} patches {file}, outside the tree")
            # Only the subtree is rebuilt: the rest of the kernel (its headers too)
            # comes from the image and its headers package, so a change there would be lost.
            if inside and not (file + "/").startswith(inside + "/"):
                raise ModuleError(f"--module {spec}: {name} patches {file}, outside {inside} (only {inside} "
                                  "is rebuilt; the rest of the kernel is the image's)")
        paths.append(path)
    return tuple(paths)


def patched_files(text):
    """The files a unified diff changes, as `patch -p1` names them."""
    files, old = [], None
    for line in text.splitlines():
        if line.startswith("--- "):
            old = line[4:].split("\t")[0].strip()
        elif line.startswith("+++ ") and old is not None:
            new = line[4:].split("\t")[0].strip()
            name = old if new == "/dev/null" else new
            files.append(os.path.normpath(name.split("/", 1)[1]) if "/" in name else name)
            old = None
    return files


# -- what runs, into the log --------------------------------------------------------------------
def _run(cmd, log, **kwargs):
    """Run cmd with its output appended to the log; the CompletedProcess (text)."""
    log.write(f"$ {shlex.join(cmd)}\n")
    log.flush()
    done = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, errors="replace", **kwargs)
    log.write(done.stdout)
    if done.returncode:
        log.write(f"(exit status {done.returncode})\n")
    log.flush()
    return done


def _say(log, message):
    log.write(f"stackcheck modules: {message}\n")
    log.flush()


@contextlib.contextmanager
def _locked(name):
    """Serialise one piece of cache work (a download, an unpack, a build) across runs."""
    os.makedirs(os.path.join(CACHE, "locks"), exist_ok=True)
    with open(os.path.join(CACHE, "locks", name + ".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _ensure_tools(tools, log):
    """Install the Debian packages of missing tools ({tool: package}), as ./check does on first use."""
    missing = sorted({pkg for tool, pkg in tools.items() if not shutil.which(tool)})
    if not missing:
        return
    try:
        archive.install(missing, log)
    except archive.ArchiveError as e:
        raise ModuleError(f"building modules needs {' '.join(missing)}: {e}") from None


def ensure_loading_tools(log_path):
    """insmod, rmmod and modprobe, with which a host loads the built modules."""
    with open(log_path, "a") as log:
        _ensure_tools(LOADING_TOOLS, log)


# -- Debian's packages ----------------------------------------------------------------------------
def _tell(log, message):
    """A choice the user must know of (an older package than asked for): on stderr too."""
    _say(log, message)
    print(f"stackcheck: {message}", file=sys.stderr, flush=True)


def _offered(package, log):
    """The versions of package in the archive, newest first (its lists brought up to date once a run)."""
    if not shutil.which("apt-cache"):
        raise ModuleError(f"no apt-cache here: Debian's {package} cannot be fetched on this machine")
    archive.update(log)
    return archive.versions(package)


def _fetch(package, version, log):
    """The .deb of package=version (version None: the archive's newest), from our cache
    or apt-get download (which raises archive.ArchiveError, one line naming it)."""
    debs = os.path.join(CACHE, "debs")
    with _locked(f"deb-{package}"):
        if version:
            pattern = re.compile(re.escape(f"{package}_{version.replace(':', '%3a')}_") + r"[^_]+\.deb$")
            cached = [f for f in os.listdir(debs) if pattern.match(f)] if os.path.isdir(debs) else []
            if cached:
                _say(log, f"{package} {version}: cached {cached[0]}")
                return os.path.join(debs, cached[0])
        return archive.download(package, version, debs, log)


def _deb_field(deb, field):
    done = subprocess.run(["dpkg-deb", "-f", deb, field], capture_output=True, text=True, check=True)
    return done.stdout.strip()


def _depends(deb):
    """[(package, relation, version)] of a .deb's Depends (the first of alternatives)."""
    found = []
    for item in _deb_field(deb, "Depends").split(","):
        m = re.match(r"\s*([^\s(|]+)(?:\s*\(\s*([<>=]+)\s*([^)\s]+)\s*\))?", item.split("|")[0])
        if m:
            found.append(m.groups())
    return found


# -- headers ---------------------------------------------------------------------------------------
def headers(release, kernel_version, log):
    """The kernel build directory (KDIR) for release.

    kernel_version (the image's Debian version) given: Debian's
    linux-headers-<release> of that version.  When the archive no longer has it, or
    does not answer, headers of another version of the same release (the release
    names the ABI), cached or from the archive, said in one line.  None (the running
    kernel, or a bare vmlinuz): /lib/modules/<release>/build when it is there, else
    Debian's headers of that release, cached or from the archive."""
    if not RELEASE.match(release):
        raise ModuleError(f"not a kernel release: {release!r}")
    if kernel_version is None:
        installed = os.path.join("/lib/modules", release, "build")
        if os.path.isfile(os.path.join(installed, "Makefile")):
            _say(log, f"headers for {release}: {installed}")
            return installed
    package = f"linux-headers-{release}"
    exact = _cached_headers(release, kernel_version)
    if exact:
        _say(log, f"headers for {release}: cached {exact}")
        return exact
    offered, why = _offered(package, log), ""
    if kernel_version in offered:
        try:
            return _unpack_headers(release, package, kernel_version, log)
        except archive.ArchiveError as e:
            offered, why = [], str(e)  # the archive does not answer: only the cache is left
    elif kernel_version:
        why = f"Debian's archive has no {package} {kernel_version}, the image's version"
    cached = _cached_headers(release, None)
    if cached:
        _tell(log, f"{why}; using the cached {package} {_headers_version(cached)}, of the same ABI")
        return cached
    if not offered:
        where = "" if kernel_version else f" and /lib/modules/{release}/build is missing"
        raise ModuleError(why or f"no kernel headers for {release}: Debian's archive has no {package}{where}")
    if why:
        _tell(log, f"{why}; using {package} {offered[0]}, of the same ABI")
    return _unpack_headers(release, package, offered[0], log)


def _headers_dir(release, version):
    return os.path.join(CACHE, "headers", f"{release}_{version}")


def _kdir(root, release):
    return os.path.join(root, "usr", "src", f"linux-headers-{release}")


def _cached_headers(release, kernel_version):
    """The unpacked headers of release (of kernel_version, or of any version when None)."""
    base = os.path.join(CACHE, "headers")
    if kernel_version:
        names = [f"{release}_{kernel_version}"]
    else:
        names = sorted((n for n in os.listdir(base) if n.startswith(release + "_")), reverse=True) \
            if os.path.isdir(base) else []
    for name in names:
        kdir = _kdir(os.path.join(base, name), release)
        if os.path.isfile(os.path.join(kdir, "Makefile")):
            return kdir
    return None


def _headers_version(kdir):
    """The Debian version of cached headers, from their root's name (<release>_<version>)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(kdir)))
    return os.path.basename(root).split("_", 1)[1]


def _unpack_headers(release, package, version, log):
    """Fetch linux-headers-<release>=version and what it needs, unpack them into one root."""
    root = _headers_dir(release, version)
    with _locked(f"headers-{release}_{version}"):
        if os.path.isfile(os.path.join(_kdir(root, release), "Makefile")):
            return _kdir(root, release)
        debs, compilers = fetch_headers(package, version, log)
        _ensure_tools({compiler: compiler for compiler in compilers}, log)
        os.makedirs(os.path.dirname(root), exist_ok=True)
        staging = tempfile.mkdtemp(dir=os.path.dirname(root), prefix=".unpack-")
        try:
            for deb in debs:
                _unpack_deb(deb, staging, log)
            _relocate(staging, root, release)
            os.rename(staging, root)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        _say(log, f"headers for {release}: {package} {version} unpacked into {root}")
    return _kdir(root, release)


def _unpack_deb(deb, target, log):
    """dpkg-deb's tar stream into tar, not dpkg-deb -x: 3x faster on the -common part's
    16,000 files (dpkg-deb -x spends its time in the kernel; measured)."""
    pipeline = f"dpkg-deb --fsys-tarfile {shlex.quote(deb)} | tar -x -C {shlex.quote(target)}"
    done = _run(["bash", "-o", "pipefail", "-c", pipeline], log)
    if done.returncode:
        raise ModuleError(f"unpacking {os.path.basename(deb)} failed ({_last_line(done.stdout)})")


def fetch_headers(package, version, log):
    """([.deb of package=version, of its -common part, of linux-kbuild], [compilers it
    names, as "gcc-12": the tool and its Debian package share the name])."""
    deb = _fetch(package, version, log)
    debs, compilers = [deb], []
    for name, relation, wanted in _depends(deb):
        if name.startswith(("linux-headers-", "linux-kbuild-")):
            exact = relation == "=" or wanted in archive.versions(name)
            debs.append(_fetch(name, wanted if exact else None, log))
        elif m := re.match(r"linux-compiler-(gcc-\d+)-", name):
            compilers.append(m.group(1))
    return debs, compilers


def _relocate(staging, root, release):
    """Make an unpacked headers tree work where it lies (root, once staging is renamed):
    absolute symlinks (lib/modules/<release>/build) point inside it, and the flavour's
    Makefile includes the -common part's Makefile inside it, not under /usr/src."""
    for directory, dirs, files in os.walk(staging):
        for name in dirs + files:
            path = os.path.join(directory, name)
            if os.path.islink(path) and os.readlink(path).startswith("/"):
                target = staging + os.readlink(path)
                os.unlink(path)
                os.symlink(os.path.relpath(target, directory), path)
    makefile = os.path.join(_kdir(staging, release), "Makefile")
    if not os.path.isfile(makefile):
        raise ModuleError(f"the headers package of {release} has no usr/src/linux-headers-{release}/Makefile")

    def inside(m):
        include, path = m.groups()
        return include + (root + path if os.path.exists(staging + path) else path)
    with open(makefile) as f:
        text = re.sub(r"^(\s*include\s+)(/\S+)", inside, f.read(), flags=re.M)
    with open(makefile, "w") as f:
        f.write(text)


# -- the kernel's own source --------------------------------------------------------------------------
def source_package(kernel_version):
    """linux-source-X.Y: Debian's source package of the kernel of that Debian version."""
    series = re.match(r"(?:\d+:)?(\d+\.\d+)", kernel_version or "")
    if not series:
        raise ModuleError("linux-source needs the kernel package's Debian version (known for --kernel SPEC)")
    return f"linux-source-{series.group(1)}"


def fetch_source(kernel_version, log):
    """The .deb of linux-source-X.Y=kernel_version (about 140 MB), cached."""
    package = source_package(kernel_version)
    if not _cached_deb(package, kernel_version):
        offered = _offered(package, log)
        if kernel_version not in offered:
            now = f"; it has {offered[0]}" if offered else ""
            raise ModuleError(f"Debian's archive has no {package} {kernel_version}, the image's version{now}")
    return _fetch(package, kernel_version, log)


def kernel_source(subtree, kernel_version, log):
    """(source root, label): Debian's linux-source of kernel_version with subtree extracted."""
    package = source_package(kernel_version)
    label = f"{package} {kernel_version}"
    root = os.path.join(CACHE, "source", f"{package}_{kernel_version}")
    marker = _extracted(subtree, kernel_version)
    with _locked(f"source-{package}_{kernel_version}"):
        if os.path.exists(marker):
            _say(log, f"{label}: {subtree} cached in {root}")
            return root, label
        deb = fetch_source(kernel_version, log)
        _extract(deb, subtree, root, label, log)
        os.makedirs(os.path.dirname(marker), exist_ok=True)
        with open(marker, "w") as f:
            f.write(subtree + "\n")
    return root, label


def _extracted(subtree, kernel_version):
    """The marker of subtree extracted from the source of kernel_version."""
    package = source_package(kernel_version)
    return os.path.join(CACHE, "source", f"{package}_{kernel_version}", ".extracted",
                        hashlib.sha256(subtree.encode()).hexdigest()[:16])


def cached(sources, release, kernel_version):
    """Whether the cache holds what building sources for that kernel needs from
    Debian's archive: headers of its release, and for linux-source its source."""
    if sources and not _cached_headers(release, None):
        return False
    return all(os.path.exists(_extracted(s.path, kernel_version))
               or _cached_deb(source_package(kernel_version), kernel_version)
               for s in sources if s.kind == "linux-source")


def _cached_deb(package, version):
    debs = os.path.join(CACHE, "debs")
    prefix = f"{package}_{version.replace(':', '%3a')}_"
    return os.path.isdir(debs) and any(f.startswith(prefix) for f in os.listdir(debs))


def _extract(deb, subtree, root, label, log):
    """Only subtree of the source tarball in the .deb, streamed: the 1.3 GB tree is never
    written out, and neither is the 138 MB tarball."""
    listing = subprocess.run(["dpkg-deb", "-c", deb], capture_output=True, text=True).stdout
    tarballs = re.findall(r"\s(\./usr/src/linux-source-[^\s/]+\.tar\.xz)$", listing, re.M)
    if len(tarballs) != 1:
        raise ModuleError(f"{os.path.basename(deb)} holds no usr/src/linux-source-*.tar.xz")
    top = os.path.basename(tarballs[0])[:-len(".tar.xz")]
    os.makedirs(root, exist_ok=True)
    _say(log, f"{label}: extracting {subtree}")
    q = shlex.quote
    pipeline = (f"dpkg-deb --fsys-tarfile {q(deb)} | tar -xOf - {q(tarballs[0])}"
                f" | tar -xJf - -C {q(root)} --strip-components=1 {q(top + '/' + subtree)}")
    done = _run(["bash", "-o", "pipefail", "-c", pipeline], log)
    if done.returncode:
        if "Not found in archive" in done.stdout:
            raise ModuleError(f"{label} has no {subtree}")
        raise ModuleError(f"extracting {subtree} from {label} failed ({_last_line(done.stdout)})")


# -- the build ----------------------------------------------------------------------------------------------
def build(source, release, kernel_version, log_path):
    """The modules of source built for kernel release, from the cache when the same
    source, patches and release were built before.  kernel_version: the image
    package's Debian version ("6.1.192-3"), None for the running kernel."""
    with open(log_path, "a") as log:
        _say(log, f"--module {source.spec} for kernel {release}")
        try:
            kdir, tree, label = _prepare(source, release, kernel_version, log)
        except (ModuleError, archive.ArchiveError) as e:
            raise ModuleError(f"--module {source.spec}: {e}") from None
        patches = tuple((os.path.basename(p), _file_sha256(p)) for p in source.patches)
        source_hash = _tree_sha256(tree, source.path if source.kind == "linux-source" else "", patches)
        key = hashlib.sha256(f"{BUILDER}\0{source.kind}\0{release}\0{source_hash}".encode()).hexdigest()[:32]
        done = os.path.join(BUILDS, key)
        # A build is renamed into place whole: a hit needs no lock (the cache may be
        # read-only, as a guest sees it).
        if not os.path.isfile(os.path.join(done, "built.json")):
            with _locked(f"build-{key}"):
                if not os.path.isfile(os.path.join(done, "built.json")):
                    return _build(source, release, kdir, tree, label, source_hash, patches, done, log, log_path)
        _say(log, f"cached: {done} (same source, patches and release; no make)")
        return _load(done, label)


def _prepare(source, release, kernel_version, log):
    """(KDIR, the tree to build, its label) once the tools, headers and source are here."""
    _ensure_tools(TOOLS, log)
    kdir = headers(release, kernel_version, log)
    if source.kind != "linux-source":
        return kdir, source.path, source.path
    root, label = kernel_source(source.path, kernel_version, log)
    if not os.path.isdir(os.path.join(root, source.path)):
        raise ModuleError(f"{label} has no directory {source.path}")
    return kdir, os.path.join(root, source.path), label


def _build(source, release, kdir, tree, label, source_hash, patches, done, log, log_path):
    os.makedirs(os.path.dirname(done), exist_ok=True)
    work = tempfile.mkdtemp(dir=os.path.dirname(done), prefix=os.path.basename(done) + ".tmp-")
    os.chmod(work, 0o755)  # mkdtemp's 0700 would hide the cached .ko from other users
    try:
        # Patches apply at src, the tree's root; make runs in src/at.  linux-source: the
        # subtree keeps its place under the source root.  DKMS: the tree is where DKMS
        # builds it, $dkms_tree/$module/$module_version/build (dkms.conf files name it).
        at = source.path if source.kind == "linux-source" else ""
        place = _dkms_place(work, tree, release, kdir, log) if source.kind == "dkms" else None
        src = place.build if place else os.path.join(work, "src")
        _copy_tree(tree, os.path.join(src, at))
        for patch in source.patches:
            _apply(source.spec, patch, src, label, log)
        if place:
            made, what = _make_dkms(source, release, kdir, place, log, log_path)
        else:
            made, what = _make_kbuild(source, release, kdir, src, at, log, log_path), "kbuild"
        text = f"{label}: {source.path}" if source.kind == "linux-source" else f"{label} ({what})"
        text += "".join(f" + {name}" for name, _ in patches)
        built = [_described(ko, text, source_hash, patches, release) for ko in made]
        for b in built:
            if not b.vermagic.startswith(release + " "):
                made_for = (b.vermagic.split() or ["no release"])[0]
                raise ModuleError(f"--module {source.spec}: {b.name} was built for {made_for}, not kernel "
                                  f"{release} (headers {kdir})")
        with open(os.path.join(work, "built.json"), "w") as f:
            json.dump([dict(vars(b), path=os.path.relpath(b.path, work), label=label) for b in built], f, indent=1)
        os.rename(work, done)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for b in built:
        ko = os.path.join(done, os.path.relpath(b.path, work))
        _say(log, f"built {b.name}: {ko} ({b.vermagic.strip()})")
    return _load(done, label)


def _load(done, label):
    """The built modules, their source named as this run names it: the same content
    may have been built from another path."""
    with open(os.path.join(done, "built.json")) as f:
        built = json.load(f)
    for b in built:
        b["source"] = b["source"].replace(b.pop("label"), label, 1)
    return [BuiltModule(**dict(b, path=os.path.join(done, b["path"]), depends=tuple(b["depends"]),
                               patches=tuple(map(tuple, b["patches"])))) for b in built]


def _described(ko, text, source_hash, patches, release):
    info = modinfo(ko)
    name = info.get("name") or os.path.basename(ko)[:-3].replace("-", "_")
    return BuiltModule(name=name, path=ko, source=text, source_hash=source_hash, patches=patches,
                       vermagic=info.get("vermagic", ""), srcversion=info.get("srcversion", ""),
                       depends=tuple(d for d in info.get("depends", "").split(",") if d), release=release)


def _make_env(release, kdir):
    """The environment DKMS gives a build (kernelver, KVERSION, KDIR, kernel_source_dir),
    without a make of ours around it, and with srcversion for every module: Debian's
    kernels are built without MODULE_SRCVERSION_ALL, and /sys/module/NAME/srcversion
    is how a guest tells which build it loaded (modpost's -a; changes no code)."""
    # No make flags of a make around us; the compiler's messages in plain English
    # (the kernel's Makefile unexports LC_ALL: LANG is what reaches gcc).
    dropped = ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES", "LANGUAGE")
    env = {k: v for k, v in os.environ.items() if k not in dropped and not k.startswith("LC_")}
    env.update(kernelver=release, KVERSION=release, KDIR=kdir, kernel_source_dir=kdir,
               CONFIG_MODULE_SRCVERSION_ALL="y", LANG="C")
    return env


def _jobs():
    return str(len(os.sched_getaffinity(0)))


def _make_kbuild(source, release, kdir, src, at, log, log_path):
    """make -C KDIR M=DIR modules, DIR being src/at; every .ko it made."""
    directory = os.path.join(src, at)
    done = _run(["make", f"-j{_jobs()}", "-C", kdir, f"M={directory}", "modules"], log,
                cwd=directory, env=_make_env(release, kdir))
    _check_make(done, source, release, src, log_path)
    made = sorted(os.path.join(d, name) for d, _, names in os.walk(directory)
                  for name in names if name.endswith(".ko"))
    if not made:
        raise ModuleError(f"--module {source.spec}: building for kernel {release} made no .ko "
                          f"(see {log_path})")
    return made


def _check_make(done, source, release, src, log_path):
    """A failed make is one line: the compiler's error, its file named within the tree
    (the build copy is gone by the time anyone reads it)."""
    if done.returncode:
        error = _compiler_error(done.stdout).replace(src + os.sep, "")
        raise ModuleError(f"--module {source.spec}: building for kernel {release} failed "
                          f"(see {log_path}): {error}")


def _compiler_error(output):
    """The compiler's last error line, else make's, else the last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for pattern in (r"(fatal )?error:", r"\*\*\*|[Ee]rror"):
        found = [line for line in lines if re.search(pattern, line)]
        if found:
            return found[-1]
    return lines[-1] if lines else "no output"


def _last_line(text):
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


# -- DKMS ----------------------------------------------------------------------------------------------
# dkms.conf is shell: bash sources it with the variables DKMS sets, then this script
# does what DKMS's read_conf does with them (dkms 3.0, dell/dkms dkms.in) and prints
# the outcome as NUL-terminated key=value records.  Regexes are matched by bash's =~,
# as DKMS matches them.
READ_CONF = r'''
kernelver=$1 arch=$2 kernel_source_dir=$3 dkms_tree=$4 source_tree=$5 module=$6 module_version=$7
kernel_config=$kernel_source_dir/include/config/auto.conf
[[ -e $kernel_config ]] || kernel_config=$kernel_source_dir/.config
. ./dkms.conf >/dev/null  # its status means nothing to DKMS either
_sc_out() { printf '%s=%s\0' "$1" "$2"; }
VER() {
    echo $1 | sed -e 's:\([^0-9]\)\([0-9]\):\1 \2:g' -e 's:\([0-9]\)\([^0-9]\):\1 \2:g' -e 's:\(.*\): \1 :' \
        -e 's: \([0-9]\) : 00\1 :g' -e 's: \([0-9][0-9]\) : 0\1 :g' -e 's: ::g'
}
_sc_out package "$PACKAGE_NAME"
_sc_out version "$PACKAGE_VERSION"
_sc_n=0
for _sc_s in ${#BUILT_MODULE_NAME[@]} ${#BUILT_MODULE_LOCATION[@]} \
            ${#DEST_MODULE_NAME[@]} ${#DEST_MODULE_LOCATION[@]}; do
    ((_sc_s > _sc_n)) && _sc_n=$_sc_s
done
for ((_sc_i=0; _sc_i < _sc_n; _sc_i++)); do
    _sc_name=${BUILT_MODULE_NAME[$_sc_i]}
    [[ ! $_sc_name ]] && ((_sc_n == 1)) && _sc_name=$PACKAGE_NAME
    _sc_loc=${BUILT_MODULE_LOCATION[$_sc_i]}
    [[ $_sc_loc && ${_sc_loc:(-1)} != / ]] && _sc_loc="$_sc_loc/"
    _sc_out module "$_sc_loc$_sc_name"
done
[[ ${MAKE_MATCH[0]} ]] || make_command=${MAKE[0]}
for ((_sc_i=0; _sc_i < ${#MAKE[@]}; _sc_i++)); do
    [[ ${MAKE[$_sc_i]} && ${MAKE_MATCH[$_sc_i]} && $kernelver =~ ${MAKE_MATCH[$_sc_i]} ]] &&
        make_command=${MAKE[$_sc_i]}
done
[[ $make_command ]] || make_command="make -C $kernel_source_dir M=$dkms_tree/$module/$module_version/build"
grep -q CONFIG_CC_IS_CLANG=y "$kernel_config" 2>/dev/null && make_command="$make_command LLVM=1"
_sc_out make "$make_command"
for ((_sc_i=0; _sc_i < ${#PATCH[@]}; _sc_i++)); do
    [[ ${PATCH[$_sc_i]} && (! ${PATCH_MATCH[$_sc_i]} || $kernelver =~ ${PATCH_MATCH[$_sc_i]}) ]] &&
        _sc_out patch "${PATCH[$_sc_i]}"
done
_sc_exclude() { _sc_out exclude "$1=\"${!1}\""; }  # the directive that excludes this kernel
[[ $BUILD_EXCLUSIVE_KERNEL && ! $kernelver =~ $BUILD_EXCLUSIVE_KERNEL ]] && _sc_exclude BUILD_EXCLUSIVE_KERNEL
[[ $BUILD_EXCLUSIVE_KERNEL_MIN && "$(VER "$kernelver")" < "$(VER "$BUILD_EXCLUSIVE_KERNEL_MIN")" ]] &&
    _sc_exclude BUILD_EXCLUSIVE_KERNEL_MIN
[[ $BUILD_EXCLUSIVE_KERNEL_MAX && "$(VER "$kernelver")" > "$(VER "$BUILD_EXCLUSIVE_KERNEL_MAX")" ]] &&
    _sc_exclude BUILD_EXCLUSIVE_KERNEL_MAX
[[ $BUILD_EXCLUSIVE_ARCH && ! $arch =~ $BUILD_EXCLUSIVE_ARCH ]] && _sc_exclude BUILD_EXCLUSIVE_ARCH
if [[ $BUILD_EXCLUSIVE_CONFIG && -e $kernel_config ]]; then
    for _sc_k in $BUILD_EXCLUSIVE_CONFIG; do
        case $_sc_k in
            !*) grep -q "^${_sc_k#!}=[ym]" "$kernel_config" && _sc_exclude BUILD_EXCLUSIVE_CONFIG ;;
            *) grep -q "^$_sc_k=[ym]" "$kernel_config" || _sc_exclude BUILD_EXCLUSIVE_CONFIG ;;
        esac
    done
fi
_sc_out pre_build "$PRE_BUILD"
_sc_out post_build "$POST_BUILD"
'''


@dataclass(frozen=True)
class DkmsPlace:
    """Where DKMS keeps a module, mirrored in our build directory: the build copy in
    $dkms_tree/$module/$module_version/build, the source as $source_tree/$module-$module_version."""
    dkms_tree: str
    source_tree: str
    module: str = ""
    version: str = ""

    @property
    def build(self):
        return os.path.join(self.dkms_tree, self.module, self.version, "build")


def _dkms_place(work, tree, release, kdir, log):
    """The DkmsPlace of tree, named by its dkms.conf's PACKAGE_NAME and PACKAGE_VERSION."""
    unnamed = DkmsPlace(os.path.join(work, "dkms"), os.path.join(work, "source"))
    conf = read_dkms_conf(tree, release, kdir, unnamed, log)
    # A version still holding a placeholder ("#MODULE_VERSION#": '#' starts a comment
    # in make) becomes a plain directory name.
    name, version = (re.sub(r"[^\w.+~-]", "_", conf.get(key) or "") for key in ("package", "version"))
    place = DkmsPlace(unnamed.dkms_tree, unnamed.source_tree, name or "module", version or "0")
    os.makedirs(place.source_tree)
    os.symlink(tree, os.path.join(place.source_tree, f"{place.module}-{place.version}"))
    return place


def read_dkms_conf(directory, release, kdir, place, log):
    """{package, version, make, pre_build, post_build: str; module, patch, exclude: [str]}
    from directory/dkms.conf, as DKMS reads it for kernel release with headers kdir,
    for the module in place (a DkmsPlace)."""
    args = ["dkms.conf", release, os.uname().machine, kdir, place.dkms_tree, place.source_tree,
            place.module, place.version]
    done = subprocess.run(["bash", "-c", READ_CONF, *args], cwd=directory, capture_output=True, text=True,
                          errors="replace")
    log.write(done.stderr)
    if done.returncode:
        raise ModuleError(f"dkms.conf in {directory} does not source in bash ({_last_line(done.stderr)})")
    conf = {"module": [], "patch": [], "exclude": []}
    for record in done.stdout.split("\0")[:-1]:
        key, _, value = record.partition("=")
        if key in ("module", "patch", "exclude"):
            conf[key].append(value)
        else:
            conf[key] = value
    return conf


def _make_dkms(source, release, kdir, place, log, log_path):
    """Build as `dkms build` does: dkms.conf's PATCHes, PRE_BUILD, its make command
    (with -jN KERNELRELEASE=<release>, as DKMS runs it), POST_BUILD; the
    BUILT_MODULE_LOCATION/BUILT_MODULE_NAME.ko of each record."""
    src = place.build
    conf = read_dkms_conf(src, release, kdir, place, log)
    name = conf.get("package")
    if not name:
        raise ModuleError(f"--module {source.spec}: dkms.conf has no PACKAGE_NAME")
    if conf["exclude"]:
        raise ModuleError(f"--module {source.spec}: {name} does not build for kernel {release} "
                          f"(dkms.conf {conf['exclude'][0]})")
    if not conf["module"]:
        raise ModuleError(f"--module {source.spec}: dkms.conf names no module (BUILT_MODULE_NAME)")
    for patch in conf["patch"]:
        _apply(source.spec, os.path.join(src, "patches", patch), src, f"{name} (dkms.conf PATCH)", log)
    env = _make_env(release, kdir)
    _build_script(source, "PRE_BUILD", conf["pre_build"], src, env, release, log, log_path)
    make = re.sub(r"^make", f"make -j{_jobs()} KERNELRELEASE={release}", conf["make"])
    _check_make(_run(["bash", "-c", f"{{ {make}; }}"], log, cwd=src, env=env), source, release, src, log_path)
    _build_script(source, "POST_BUILD", conf["post_build"], src, env, release, log, log_path)
    made = []
    for module in conf["module"]:
        ko = os.path.join(src, module + ".ko")
        if not os.path.isfile(ko):
            raise ModuleError(f"--module {source.spec}: the build for kernel {release} made no {module}.ko, "
                              f"which dkms.conf names (see {log_path})")
        made.append(ko)
    return made, f"dkms {name}"


def _build_script(source, what, script, src, env, release, log, log_path):
    """DKMS's PRE_BUILD/POST_BUILD: a program of the build tree, with its arguments."""
    if not script:
        return
    program = os.path.join(src, script)
    if not os.access(program.split()[0], os.X_OK):
        _say(log, f"warning: the {what} script {script} is not executable (DKMS skips it too)")
        return
    done = _run(["bash", "-c", f"exec {program}"], log, cwd=src, env=env)
    if done.returncode:
        raise ModuleError(f"--module {source.spec}: dkms.conf {what} failed for kernel {release} "
                          f"(see {log_path}): {_last_line(done.stdout)}")


# -- trees and patches ---------------------------------------------------------------------------------
def _walk(tree):
    """(relative path, absolute path) of the tree's files and symlinks, sorted, without build products."""
    for directory, dirs, files in os.walk(tree):
        # os.walk lists a symlink to a directory among dirs: it is kept as a link
        links = [d for d in dirs if os.path.islink(os.path.join(directory, d))]
        dirs[:] = sorted(d for d in dirs if d not in links and not BUILD_PRODUCTS.search(d))
        for name in sorted(files + links):
            if not BUILD_PRODUCTS.search(name):
                path = os.path.join(directory, name)
                yield os.path.relpath(path, tree), path


def _file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _tree_sha256(tree, prefix, patches):
    """sha256 over each file's path (under prefix), executable bit and content (a
    symlink's target), then each patch's name and sha256, in order."""
    digest = hashlib.sha256()
    for relative, path in _walk(tree):
        if os.path.islink(path):
            content = "link:" + os.readlink(path)
        else:
            content = ("x:" if os.access(path, os.X_OK) else "f:") + _file_sha256(path)
        digest.update(f"{os.path.join(prefix, relative)}\0{content}\0".encode())
    for name, sha in patches:
        digest.update(f"patch\0{name}\0{sha}\0".encode())
    return digest.hexdigest()


def _copy_tree(tree, target):
    """A writable copy of the tree (the original may have no write bits)."""
    for relative, path in _walk(tree):
        dest = os.path.join(target, relative)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        if os.path.islink(path):
            os.symlink(os.readlink(path), dest)
        else:
            shutil.copyfile(path, dest)
            os.chmod(dest, 0o755 if os.access(path, os.X_OK) else 0o644)
    os.makedirs(target, exist_ok=True)


def _apply(spec, patch, root, label, log):
    """patch -p1 at root; a patch that does not apply is one line naming it and where it failed."""
    done = _run(["patch", "-p1", "--batch", "--forward", "--no-backup-if-mismatch", "-r", "-",
                 "-i", patch], log, cwd=root)
    if done.returncode:
        raise ModuleError(f"--module {spec}: {os.path.basename(patch)} does not apply to {label}: "
                          f"{_patch_failure(done.stdout)}")


def _patch_failure(output):
    """Where a patch failed, from patch's output: "fs/x.c: Hunk #1 FAILED at 120"."""
    current, missing = None, False
    for line in output.splitlines():
        if m := re.match(r"(?:patching|checking) file (.+)", line):
            current = m.group(1).strip("'\"")
        elif "can't find file to patch" in line:
            missing = True
        elif missing and (m := re.match(r"\|(?:\+\+\+|---) (?:[^/\s]+/)?(\S+)", line)):
            return f"{m.group(1)}: no such file"
        elif "FAILED" in line or "Reversed (or previously applied)" in line or "malformed" in line:
            return (f"{current}: " if current else "") + line.strip().rstrip(".")
    return _last_line(output)


# -- .modinfo ---------------------------------------------------------------------------------------------
def modinfo(ko_path):
    """The .modinfo section of a module (.ko, .ko.xz, .ko.gz): {key: value}; a key that
    occurs more than once (alias, parm) maps to a tuple of its values in order.
    Read from the ELF file itself: kmod's modinfo may be absent."""
    opener = lzma.open if ko_path.endswith(".xz") else gzip.open if ko_path.endswith(".gz") else open
    with opener(ko_path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF":
        raise ModuleError(f"{ko_path}: not an ELF file")
    wide, order = data[4] == 2, "<" if data[5] == 1 else ">"
    if wide:
        (shoff,) = struct.unpack_from(order + "Q", data, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from(order + "HHH", data, 0x3A)
        header = order + "IIQQQQ"
    else:
        (shoff,) = struct.unpack_from(order + "I", data, 0x20)
        shentsize, shnum, shstrndx = struct.unpack_from(order + "HHH", data, 0x2E)
        header = order + "IIIIII"
    sections = [struct.unpack_from(header, data, shoff + i * shentsize) for i in range(shnum)]
    names_at, names_size = sections[shstrndx][4], sections[shstrndx][5]
    names = data[names_at:names_at + names_size]
    values = {}
    for name_at, _, _, _, offset, size in sections:
        if names[name_at:names.index(b"\0", name_at)] == b".modinfo":
            for entry in data[offset:offset + size].split(b"\0"):
                key, sep, value = entry.decode(errors="replace").partition("=")
                if sep:
                    values.setdefault(key, []).append(value)
    return {key: found[0] if len(found) == 1 else tuple(found) for key, found in values.items()}
