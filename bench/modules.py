"""bench/modules: what --module costs, from an empty cache to a cached build.

    ./bench/run modules [--kernel SPEC] [--rounds N] [--reuse-downloads] [--guest]

For the kernel of --kernel (Debian's linux-image-amd64 by default), in a cache
of its own (a temporary directory: the user's cache is neither used nor
touched): Debian's headers fetched and unpacked; Debian's linux-source of the
image's version fetched and fs/overlayfs extracted, beside its floor in the
same run (decompressing the whole tarball: xz streams have no index, so any
subtree costs a full pass); then shiftfs (a DKMS tree, ../shared/shiftfs) and
overlayfs (linux-source:fs/overlayfs) built cold and cached, beside the bare
`make` of the same tree on the same headers, as ratios.  Medians of N rounds
for the builds.  --reuse-downloads takes the .debs already in the user's cache
(the fetch is then not measured).

--guest also boots the kernel twice with ./check: the quick group on idmapped
mounts alone, then with shiftfs built and loaded beside it; it prints the boot
to the first case of each and the median per-case time on shiftfs beside
idmapped's in the same guest.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from harness import modules, vm  # noqa: E402

SHIFTFS = os.path.join(ROOT, "..", "shared", "shiftfs")
SUBTREE = "fs/overlayfs"


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def bare_make(tree, command, kdir, release, scratch):
    """The same build by hand: a copy of the tree, its make, nothing else; seconds."""
    copy = os.path.join(scratch, "bare")
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(tree, copy)
    subprocess.run(["chmod", "-R", "u+w", copy], check=True)
    env = dict(os.environ, KVERSION=release, KDIR=kdir, kernelver=release)
    start = time.perf_counter()
    subprocess.run(command(copy), cwd=copy, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def build_rounds(source, kernel, rounds, log, scratch):
    """(median cold, median cached) seconds of modules.build, every cold round in new builds."""
    cold, cached = [], []
    for n in range(rounds):
        modules.BUILDS = os.path.join(scratch, f"builds-{source.kind}-{n}")
        cold.append(timed(lambda: modules.build(source, kernel.release, kernel.version, log))[0])
        cached.append(timed(lambda: modules.build(source, kernel.release, kernel.version, log))[0])
    return statistics.median(cold), statistics.median(cached)


def guest_run(kernel_spec, args, results):
    """./check in a guest; (seconds to the first case, {stack: [case seconds]})."""
    done = subprocess.run([os.path.join(ROOT, "check"), "--kernel", kernel_spec, "--results", results, *args],
                          capture_output=True, text=True)
    boot = float(done.stderr.split("booted to the first case in ")[1].split(" s")[0])
    times = {}
    for xml in (os.path.join(results, d, "result.xml") for d in os.listdir(results)):
        for case in ET.parse(xml).getroot().iter("testcase"):
            if case.find("skipped") is None:
                stack = {p.get("name"): p.get("value") for p in case.iter("property")}["stack"]
                times.setdefault(stack, []).append(float(case.get("time")))
    return boot, times


def guest_costs(kernel_spec, scratch):
    quick = ["-g", "quick", "--underlay", "ext4", "--stack", "idmapped"]
    plain, _ = guest_run(kernel_spec, quick, os.path.join(scratch, "plain"))
    with_module, times = guest_run(kernel_spec, [*quick, "--stack", "shiftfs", "--module", SHIFTFS],
                                   os.path.join(scratch, "shiftfs"))
    print(f"guest    boot to the first case: {plain:.1f} s; with shiftfs loaded {with_module:.1f} s "
          f"({with_module / plain:.2f}x)")
    shiftfs, idmapped = (statistics.median(times[s]) for s in ("shiftfs", "idmapped"))
    print(f"guest    quick group over ext4, median per case: shiftfs {shiftfs:.2f} s, idmapped "
          f"{idmapped:.2f} s ({shiftfs / idmapped:.2f}x), {len(times['shiftfs'])} and "
          f"{len(times['idmapped'])} cases in the same guest")


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernel", default="linux-image-amd64")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reuse-downloads", action="store_true")
    parser.add_argument("--guest", action="store_true", help="also the guest's boot and per-case times")
    args = parser.parse_args()
    kernel = vm.resolve_kernel(args.kernel)
    users_debs = os.path.join(modules.CACHE, "debs")
    scratch = tempfile.mkdtemp(prefix="stackcheck-bench-modules-")
    modules.CACHE = os.path.join(scratch, "cache")
    log = os.path.join(scratch, "build.log")
    try:
        if args.reuse_downloads and os.path.isdir(users_debs):
            shutil.copytree(users_debs, os.path.join(modules.CACHE, "debs"), copy_function=os.link)
        print(f"kernel {kernel.release} (Debian {kernel.version}); a fresh cache in {scratch}; "
              f"builds: medians of {args.rounds}")

        with open(log, "a") as out:
            package = f"linux-headers-{kernel.release}"
            fetch, (debs, _) = timed(lambda: modules.fetch_headers(package, kernel.version, out))
            unpack, kdir = timed(lambda: modules.headers(kernel.release, kernel.version, out))
            print(f"headers  {package} and what it needs: fetch {fetch:.1f} s "
                  f"({sum(map(os.path.getsize, debs)) >> 20} MiB), unpack {unpack:.1f} s")

            fetch, deb = timed(lambda: modules.fetch_source(kernel.version, out))
            extract, (root, label) = timed(lambda: modules.kernel_source(SUBTREE, kernel.version, out))
            floor, _ = timed(lambda: subprocess.run(
                ["bash", "-o", "pipefail", "-c", f"dpkg-deb --fsys-tarfile '{deb}' | tar -xOf - --wildcards "
                 "'./usr/src/linux-source-*.tar.xz' | xz -dc >/dev/null"], check=True))
            print(f"source   {label}: fetch {fetch:.1f} s ({os.path.getsize(deb) >> 20} MiB), "
                  f"extract {SUBTREE} {extract:.1f} s; the floor, decompressing the whole tarball, "
                  f"{floor:.1f} s ({extract / floor:.2f}x)")

        print(f"{'module':<10}{'cold':>9}{'bare make':>11}{'cold/bare':>11}{'cached':>11}{'cached/cold':>13}")
        jobs = f"-j{len(os.sched_getaffinity(0))}"
        peers = []
        if os.path.isfile(os.path.join(SHIFTFS, "dkms.conf")):
            # dkms.conf's MAKE[0], as DKMS runs it
            peers.append(("shiftfs", modules.parse(SHIFTFS), SHIFTFS, lambda copy: [
                "make", jobs, f"KERNELRELEASE={kernel.release}", f"KVERSION={kernel.release}"]))
        else:
            print(f"{'shiftfs':<10}not run: no shiftfs source at ../shared/shiftfs")
        peers.append(("overlay", modules.parse(f"linux-source:{SUBTREE}"), os.path.join(root, SUBTREE),
                      lambda copy: ["make", jobs, "-C", kdir, f"M={copy}", "modules"]))
        for name, source, tree, command in peers:
            bare = statistics.median(bare_make(tree, command, kdir, kernel.release, scratch)
                                     for _ in range(args.rounds))
            cold, cached = build_rounds(source, kernel, args.rounds, log, scratch)
            print(f"{name:<10}{cold:>8.2f}s{bare:>10.2f}s{cold / bare:>10.2f}x{cached * 1000:>8.1f}ms"
                  f"{cached / cold:>12.4f}x")
        if args.guest and os.path.isfile(os.path.join(SHIFTFS, "dkms.conf")):
            guest_costs(args.kernel, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
