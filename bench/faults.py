"""bench/faults: what a faulty device costs, per backend, beside a plain loop device.

    ./bench/run faults [--rounds N]

For every fault backend this kernel can run (dm where it has device-mapper,
fusedev otherwise): median time to create the device with ext4 on it, to fail a
range, to heal it, and to tear it all down; the same set-up and teardown on a
plain loop device as the peer in the same run; and the wall time of
`./check -g eio -j 2`.
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

from harness import faults, rundir, scratch  # noqa: E402
from harness.probe import run_probe  # noqa: E402


def timed(fn):
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


def cycle(pool, backend):
    """(create, fail, heal, teardown) in ms for one faulty ext4 underlay."""
    context = pool.underlay("ext4", fault_backend=backend)
    start = time.perf_counter()
    under = context.__enter__()
    create = (time.perf_counter() - start) * 1000
    fail = timed(lambda: under.faulty.fail([(1 << 20, 1 << 20)]))
    heal = timed(under.faulty.heal)
    teardown = timed(lambda: context.__exit__(None, None, None))
    return create, fail, heal, teardown


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    run = rundir.RunDir.create()
    try:
        probe = run_probe(run.sub("probe"))
        pool = scratch.ScratchPool(run.sub("pool"))
        samples = []
        for _ in range(args.rounds):
            start = time.perf_counter()
            with pool.underlay("ext4"):
                pass
            samples.append((time.perf_counter() - start) * 1000)
        plain = statistics.median(samples)
        print(f"kernel {probe.kernel}; medians of {args.rounds}, ms")
        print(f"{'backend':<10}{'create':>9}{'fail':>8}{'heal':>8}{'teardown':>10}{'total':>9}{'vs plain loop':>15}")
        for name, backend in faults.backends().items():
            why = backend.unavailable(probe)
            if why:
                print(f"{name:<10}not run: {why}")
                continue
            rows = [cycle(pool, backend) for _ in range(args.rounds)]
            med = [statistics.median(col) for col in zip(*rows, strict=True)]
            total = med[0] + med[3]
            print(f"{name:<10}" + "".join(f"{v:>{w}.1f}" for v, w in zip(med, (9, 8, 8, 10), strict=True))
                  + f"{total:>9.1f}{total / plain:>14.1f}x")
        print(f"{'plain loop':<10}{plain:>9.1f} (create + teardown of ext4 on a loop device)")
        pool.close()
    finally:
        run.remove()
    with tempfile.TemporaryDirectory() as results:
        start = time.perf_counter()
        done = subprocess.run([os.path.join(ROOT, "check"), "-g", "eio", "-j", "2", "--results", results],
                              capture_output=True, text=True)
        print(f"./check -g eio -j 2: {time.perf_counter() - start:.1f} s ({done.stdout.strip().splitlines()[-2]})")


if __name__ == "__main__":
    main()
