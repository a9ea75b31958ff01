"""bench/fixtures: what a case's stack costs, against bare syscalls in the same run.

    ./bench/run fixtures [--rounds N] [--no-check]

Prints, per stack x underlay, the median set-up + teardown of the `stack`
fixture's work (fresh underlay, stack mount, unmount, underlay gone) beside
the same mounts made with bare syscalls, as a ratio, and the wall time of
`./check -g quick` with -j 1 and -j 2.  Ratios, not absolute times, are what
compare across these noisy machines.  Targets (issue 3): overlay on tmpfs
under 5 ms, any kernel stack on loop-backed ext4 under 60 ms, the quick group
under 60 s, -j 2 at least 1.5x faster than -j 1.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from harness import loopdev, rundir, scratch, stacks, syscalls  # noqa: E402
from harness.probe import run_probe  # noqa: E402


def median_ms(fn, rounds):
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


def fixture_cycle(pool, variant, fs, workdir):
    with pool.underlay(fs) as under:
        stack = stacks.stack_class(variant)(variant, under, workdir)
        stack.mount()
        stack.unmount()


def bare_cycle(fs, directory):
    """The same kernel work with no harness: mkfs + loop + mount (or tmpfs), overlay, umounts."""
    under = os.path.join(directory, "bare-under")
    merged = os.path.join(directory, "bare-merged")
    os.makedirs(under, exist_ok=True)
    os.makedirs(merged, exist_ok=True)
    loop = None
    if fs == "tmpfs":
        syscalls.mount("bench", under, "tmpfs", 0, None)
    else:
        image = os.path.join(directory, "bare.img")
        with open(image, "wb") as f:
            f.truncate(scratch.IMAGE_SIZE)
        loop = loopdev.LoopDevice(image).attach()
        subprocess.run(scratch.MKFS[fs] + [loop.path], check=True, capture_output=True)
        syscalls.mount(loop.path, under, fs, 0, None)
    for d in ("l", "u", "w"):
        os.makedirs(os.path.join(under, d))
    syscalls.mount("bench", merged, "overlay", 0, f"lowerdir={under}/l,upperdir={under}/u,workdir={under}/w")
    syscalls.umount(merged)
    syscalls.umount(under)
    if loop:
        loop.detach()
        os.unlink(loop.image)


def wall_time(args):
    start = time.perf_counter()
    done = subprocess.run([os.path.join(ROOT, "check"), *args], capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode not in (0, 1):
        raise SystemExit(f"./check {' '.join(args)} failed: {done.stderr.strip()}")
    return elapsed, done.stdout.strip().splitlines()[-2]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--no-check", action="store_true", help="skip the ./check wall-time runs")
    args = parser.parse_args()

    run = rundir.RunDir.create()
    try:
        probe = run_probe(run.sub("probe"))
        pool = scratch.ScratchPool(run.sub("pool"))
        workdir = run.sub("stack")
        bare = {}
        print(f"kernel {probe.kernel}; median of {args.rounds} rounds, milliseconds")
        print(f"{'stack-underlay':<26}{'fixture':>9}{'bare':>9}{'ratio':>8}")
        for fs in scratch.UNDERLAY_FILESYSTEMS:
            if scratch.unavailable(fs, probe):
                continue
            bare[fs] = median_ms(lambda fs=fs: bare_cycle(fs, run.sub("bare")), args.rounds)
            for variant in stacks.default_variants():
                if stacks.unavailable(variant, fs, probe):
                    continue
                ms = median_ms(lambda v=variant, fs=fs: fixture_cycle(pool, v, fs, workdir), args.rounds)
                print(f"{variant + '-' + fs:<26}{ms:>9.2f}{bare[fs]:>9.2f}{ms / bare[fs]:>8.2f}")
        if not args.no_check:
            with tempfile.TemporaryDirectory() as results:
                serial, summary1 = wall_time(["-g", "quick", "--results", results])
                parallel, summary2 = wall_time(["-g", "quick", "-j", "2", "--results", results])
            print(f"./check -g quick -j 1: {serial:.1f} s ({summary1})")
            print(f"./check -g quick -j 2: {parallel:.1f} s ({summary2}); speed-up {serial / parallel:.2f}x")
    finally:
        run.remove()


if __name__ == "__main__":
    main()
