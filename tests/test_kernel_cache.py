"""The kernel package cache when Debian's archive moves on (harness/vm.py,
harness/modules.py, harness/archive.py).

Debian's archive here is a stand-in: apt-get and apt-cache on PATH that answer
from a directory the test fills with small packages of made-up kernels (a
vmlinuz of random bytes, headers with a Makefile), and that hang when told to.
No network, no guest: the time limit is two seconds.
"""

import os
import shutil
import subprocess

import psutil
import pytest

from conftest import waits_for
from harness import archive, modules, vm

LIMIT = "2"  # seconds: $STACKCHECK_DOWNLOAD_TIMEOUT for these tests
ONE = ("stack/001", "--stack", "overlay", "--underlay", "tmpfs")

APT_GET = """#!/bin/sh
# apt-get download from $FAKE_ARCHIVE/pool, or never answering once $FAKE_ARCHIVE/hangs
# exists; update and install answer at once.
case "$1" in
download)
    [ -e "$FAKE_ARCHIVE/hangs" ] && exec tail -f "$FAKE_ARCHIVE/hangs"
    package=${2%%=*} version=${2#*=}
    exec cp "$FAKE_ARCHIVE/pool/${package}_${version}_amd64.deb" . ;;
esac
"""
APT_CACHE = """#!/bin/sh
# apt-cache show --no-all-versions P, apt-cache madison P: $FAKE_ARCHIVE/<show|madison>/P
for package; do :; done
exec cat "$FAKE_ARCHIVE/$1/$package" 2>/dev/null
"""


class FakeArchive:
    def __init__(self, path):
        self.path = path
        for d in ("bin", "pool", "show", "madison"):
            os.makedirs(os.path.join(path, d))
        for name, text in (("apt-get", APT_GET), ("apt-cache", APT_CACHE)):
            with open(os.path.join(path, "bin", name), "w") as f:
                f.write(text)
            os.chmod(os.path.join(path, "bin", name), 0o755)

    def publish(self, package, version, depends="", files=()):
        """package=version in the archive: its .deb (with files {path: content}) and its record."""
        build_deb(os.path.join(self.path, "pool"), package, version, files)
        self.offer(package, version, depends)

    def offer(self, package, version, depends=""):
        """The lists name package=version, apt's candidate now (newest first in madison's)."""
        with open(os.path.join(self.path, "show", package), "w") as f:
            f.write(f"Package: {package}\nVersion: {version}\n" + (f"Depends: {depends}\n" if depends else ""))
        madison = os.path.join(self.path, "madison", package)
        earlier = open(madison).read() if os.path.exists(madison) else ""
        with open(madison, "w") as f:
            f.write(f" {package} | {version} | fake bookworm-security/main amd64 Packages\n" + earlier)

    def hang(self):
        open(os.path.join(self.path, "hangs"), "w").close()

    def processes(self):
        """Processes of this archive still running (a download never killed)."""
        return [p for p in psutil.process_iter(["cmdline"]) if self.path in " ".join(p.info["cmdline"] or [])]


def build_deb(directory, package, version, files):
    root = os.path.join(directory, f".{package}")
    for path, content in files.items():
        os.makedirs(os.path.join(root, os.path.dirname(path)), exist_ok=True)
        with open(os.path.join(root, path), "wb") as f:
            f.write(content)
    os.makedirs(os.path.join(root, "DEBIAN"))
    with open(os.path.join(root, "DEBIAN", "control"), "w") as f:
        f.write(f"Package: {package}\nVersion: {version}\nArchitecture: amd64\n"
                "Maintainer: stackcheck <stackcheck@localhost>\nDescription: a made-up kernel package\n")
    deb = os.path.join(directory, f"{package}_{version}_amd64.deb")
    subprocess.run(["dpkg-deb", "-Zgzip", "-b", root, deb], check=True, capture_output=True)
    shutil.rmtree(root)
    return deb


def image(release):
    """The files of a kernel image package of release (it boots nothing)."""
    return {f"boot/vmlinuz-{release}": os.urandom(4096), f"lib/modules/{release}/modules.builtin": b""}


def headers_files(release):
    return {f"usr/src/linux-headers-{release}/Makefile": b"# made up\n"}


@pytest.fixture
def apt(tmp_path, monkeypatch):
    """The stand-in archive on PATH, and stackcheck's caches in this test's scratch."""
    fake = FakeArchive(str(tmp_path / "archive"))
    fake.env = {"PATH": f"{fake.path}/bin:{os.environ['PATH']}", "FAKE_ARCHIVE": fake.path,
                archive.TIMEOUT_ENV: LIMIT, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    for name, value in fake.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(archive, "_update", {})
    monkeypatch.setattr(vm, "CACHE", str(tmp_path / "cache" / "stackcheck" / "kernels"))
    monkeypatch.setattr(modules, "CACHE", str(tmp_path / "cache" / "stackcheck" / "modules"))
    os.makedirs(vm.CACHE)
    yield fake
    assert fake.processes() == []


def cache_image(release, version):
    """A kernel image in the cache, as an earlier run left it."""
    build_deb(vm.CACHE, f"linux-image-{release}", version, image(release))


def cache_headers(release, version):
    kdir = os.path.join(modules.CACHE, "headers", f"{release}_{version}", "usr", "src", f"linux-headers-{release}")
    os.makedirs(kdir)
    open(os.path.join(kdir, "Makefile"), "w").close()


def publish_kernel(apt, release, version):
    """The archive moves on: linux-image-amd64 names the image of release now."""
    apt.publish(f"linux-image-{release}", version, files=image(release))
    apt.offer("linux-image-amd64", version, depends=f"linux-image-{release} (= {version})")


def test_the_archive_s_current_kernel_replaces_a_stale_cached_one(apt, capsys):
    cache_image("6.1.0-56-amd64", "6.1.170-1")
    publish_kernel(apt, "6.1.0-99-amd64", "6.1.999-1")
    kernel = vm.resolve_kernel("linux-image-amd64")
    assert (kernel.release, kernel.version, kernel.origin) == ("6.1.0-99-amd64", "6.1.999-1", "")
    assert "fetching linux-image-6.1.0-99-amd64 6.1.999-1" in capsys.readouterr().err
    again = vm.resolve_kernel("linux-image-amd64")  # now a cache hit: nothing fetched
    assert again == kernel and "fetching" not in capsys.readouterr().err


def test_when_the_archive_does_not_answer_the_newest_complete_cached_kernel_runs_named(apt, capsys):
    cache_image("6.1.0-55-amd64", "6.1.160-1")
    cache_image("6.1.0-56-amd64", "6.1.170-1")
    publish_kernel(apt, "6.1.0-99-amd64", "6.1.999-1")
    apt.hang()
    kernel = vm.resolve_kernel("linux-image-amd64")
    said = capsys.readouterr().err.splitlines()[-1]
    assert (kernel.release, kernel.version) == ("6.1.0-56-amd64", "6.1.170-1")
    assert said.startswith("stackcheck: apt-get download linux-image-6.1.0-99-amd64=6.1.999-1: no answer "
                           f"within {LIMIT} s") and "using the cached linux-image-6.1.0-56-amd64 6.1.170-1" in said
    assert kernel.origin.startswith("from the cache: apt-get download linux-image-6.1.0-99-amd64")
    # With --module, complete means its headers are cached too: only 6.1.0-55's are.
    cache_headers("6.1.0-55-amd64", "6.1.160-1")
    tree = modules.ModuleSource("hello", "kbuild", "/hello")  # any tree: only its kind matters here
    kernel = vm.resolve_kernel("linux-image-amd64", complete=lambda release, version: modules.cached(
        [tree], release, version))
    assert (kernel.release, kernel.version) == ("6.1.0-55-amd64", "6.1.160-1")


def test_without_a_cached_kernel_an_archive_that_does_not_answer_is_one_error(apt):
    publish_kernel(apt, "6.1.0-99-amd64", "6.1.999-1")
    apt.hang()
    with pytest.raises(vm.GuestError) as error:
        vm.resolve_kernel("linux-image-amd64")
    assert str(error.value).startswith("apt-get download linux-image-6.1.0-99-amd64=6.1.999-1: no answer within")
    assert "holds no linux-image-amd64 to fall back on" in str(error.value)


@waits_for(60)
def test_a_hung_download_ends_the_run_with_one_line_and_exit_2(apt, check):
    publish_kernel(apt, "6.1.0-99-amd64", "6.1.999-1")
    apt.hang()
    check.env.update(apt.env)
    done = check("--kernel", "linux-image-amd64", *ONE, timeout=60)
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("check:")]
    assert len(errors) == 1, done.stderr
    assert errors[0].startswith("check: --kernel linux-image-amd64: apt-get download "
                                f"linux-image-6.1.0-99-amd64=6.1.999-1: no answer within {LIMIT} s"), errors


@waits_for(60)
@pytest.mark.skipif(not shutil.which("qemu-system-x86_64"), reason="qemu-system-x86 is not installed")
def test_a_run_on_a_cached_kernel_says_which_in_its_results(apt, check):
    """The made-up kernel does not boot (QEMU refuses it at once): the run still
    names the kernel it took, on stderr and at the head of console.log."""
    cache_image("6.1.0-56-amd64", "6.1.170-1")
    publish_kernel(apt, "6.1.0-99-amd64", "6.1.999-1")
    apt.hang()
    check.env.update(apt.env)
    done = check("--kernel", "linux-image-amd64", *ONE, timeout=60)
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr
    assert "using the cached linux-image-6.1.0-56-amd64 6.1.170-1" in done.stderr
    assert "stopped before the cases finished" in done.stderr and "last line: 'qemu" in done.stderr
    with open(os.path.join(check.results, "6.1.0-56-amd64", "console.log")) as f:
        head = f.readline()
    assert head.startswith("stackcheck: booting linux-image-6.1.0-56-amd64 6.1.170-1 (from the cache: "
                           "apt-get download linux-image-6.1.0-99-amd64=6.1.999-1: no answer"), head


def test_headers_of_the_image_s_version_gone_from_the_archive_are_taken_of_the_same_abi(apt, tmp_path, capsys):
    release = "6.1.0-56-amd64"
    apt.publish(f"linux-headers-{release}", "6.1.170-2", files=headers_files(release))
    with open(tmp_path / "build.log", "w") as log:
        kdir = modules.headers(release, "6.1.170-1", log)
    assert os.path.isfile(os.path.join(kdir, "Makefile")) and f"{release}_6.1.170-2" in kdir
    said = capsys.readouterr().err.strip()
    assert said == (f"stackcheck: Debian's archive has no linux-headers-{release} 6.1.170-1, the image's version; "
                    f"using linux-headers-{release} 6.1.170-2, of the same ABI")


def test_headers_the_archive_does_not_give_in_time(apt, tmp_path, capsys):
    """Cached headers of the same ABI stand in, said; without them, one line naming the package."""
    release = "6.1.0-56-amd64"
    apt.publish(f"linux-headers-{release}", "6.1.170-1", files=headers_files(release))
    apt.hang()
    with open(tmp_path / "build.log", "w") as log:
        with pytest.raises(modules.ModuleError, match=f"^apt-get download linux-headers-{release}=6.1.170-1: "
                                                       f"no answer within {LIMIT} s"):
            modules.headers(release, "6.1.170-1", log)
        cache_headers(release, "6.1.160-1")
        kdir = modules.headers(release, "6.1.170-1", log)
    assert f"{release}_6.1.160-1" in kdir
    assert capsys.readouterr().err.strip().endswith(f"using the cached linux-headers-{release} 6.1.160-1, "
                                                    "of the same ABI")


def test_linux_source_of_the_image_s_version_gone_from_the_archive_is_one_error(apt, tmp_path):
    apt.offer("linux-source-6.1", "6.1.999-1")
    with open(tmp_path / "build.log", "w") as log:
        with pytest.raises(modules.ModuleError) as error:
            modules.fetch_source("6.1.170-1", log)
    assert str(error.value) == ("Debian's archive has no linux-source-6.1 6.1.170-1, the image's version; "
                                "it has 6.1.999-1")
