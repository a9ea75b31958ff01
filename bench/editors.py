"""bench/editors: what each real client costs a case, beside cases with no client in the same run.

    ./bench/run editors [--stack idmapped] [--underlay tmpfs] [--rounds N] [--results DIR]

Runs ./check N times on one stack and underlay, each time the editors group
(cases/test_editors.py) and its peer, stack/010-013: the same warm-reader
scenario (S3) with the host's save done by Python (write-temp + rename, backup
by rename, copy in place, unlink + create), no program started.  Prints each
client and style's median seconds per case (set-up, call and teardown, as
result.xml has them) and as a ratio to the peer's (the median of the four
peer cases over all runs: one alone is too short to time well), beside the
figures of the last bench run on the same stack and underlay
(DIR/bench-editors.json; DIR is ./check's results/ unless given).  Ratios,
not absolute times, are what compare across these shared, noisy machines.
The host's brz and git repositories are made once per run and copied
(Client.prepare): on one stack and underlay the first case of each style pays
for them; over more, they share it.
"""

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from cases.test_editors import CONTAINER_EDITS, HOST_EDITS  # noqa: E402
from harness import results as res  # noqa: E402

PEERS = ("stack/010", "stack/011", "stack/012", "stack/013")


def one_round(cases, stack, underlay):
    """({case id: seconds}, wall seconds, kernel) of one ./check run of the cases."""
    with tempfile.TemporaryDirectory() as results:
        start = time.perf_counter()
        done = subprocess.run([os.path.join(ROOT, "check"), *cases, "--stack", stack, "--underlay", underlay,
                               "--results", results], capture_output=True, text=True)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"./check exited with {done.returncode}\n{done.stdout[-3000:]}{done.stderr}")
        run_props, found = res.read_xml(res.find_xml(results))
    ran = {c.case_id: c.duration for c in found if c.outcome in (res.PASS, res.XFAIL)}
    missing = [c for c in cases if c not in ran]  # not run here: no figure to give
    if missing:
        raise SystemExit(f"not run on {stack} over {underlay}: {' '.join(missing)}")
    return ran, wall, run_props.get("kernel", "")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stack", default="idmapped")
    parser.add_argument("--underlay", default="tmpfs")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--results", default=os.path.join(ROOT, "results"), metavar="DIR")
    args = parser.parse_args()
    where = f"{args.stack}-{args.underlay}"
    cases = {c: ("(peer)", "", "host") for c in PEERS}
    cases.update({c: (name, style, "host") for c, (name, style, _) in HOST_EDITS.items()})
    cases.update({c: (name, style, "container") for c, (name, style, _) in CONTAINER_EDITS.items()})

    samples, walls, kernel = {c: [] for c in cases}, [], ""
    for _ in range(args.rounds):
        times, wall, kernel = one_round(list(cases), args.stack, args.underlay)
        walls.append(wall)
        for c, seconds in times.items():
            samples[c].append(seconds)
    median = {c: statistics.median(s) for c, s in samples.items() if c not in PEERS}
    peer = statistics.median(s for c in PEERS for s in samples[c])

    record_path = os.path.join(args.results, "bench-editors.json")
    try:
        with open(record_path) as f:
            records = json.load(f)
    except (OSError, ValueError):
        records = {}
    last = records.get(where)
    print(f"kernel {kernel}; {args.stack} over {args.underlay}; medians of {args.rounds} runs of ./check, "
          "seconds per case (set-up, call, teardown)")
    if last:
        print(f"previous: {last['date']}, kernel {last['kernel']}, {last['rounds']} runs")
    print(f"{'case':<11}{'client':<8}{'style':<28}{'saves on':<10}{'s':>7}{'x peer':>8}"
          + (f"{'previous s':>12}{'x peer':>8}" if last else ""))
    rows = [("peer", "(none)", "Python, stack/010-013", "host", peer, last and last["peer"])]
    rows += [(c, name, style, side, median[c], last and last["cases"].get(c))
             for c, (name, style, side) in cases.items() if c not in PEERS]
    rows.append(("the group", "", "", "", sum(median.values()), last and sum(last["cases"].values())))
    for c, name, style, side, seconds, before in rows:
        line = f"{c:<11}{name:<8}{style:<28}{side:<10}{seconds:>7.3f}{seconds / peer:>8.1f}"
        if before:
            line += f"{before:>12.3f}{before / last['peer']:>8.1f}"
        print(line)
    print(f"./check wall time per run: {', '.join(f'{w:.1f}' for w in walls)} s")

    records[where] = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "kernel": kernel,
                      "rounds": args.rounds, "peer": peer, "cases": median}
    os.makedirs(args.results, exist_ok=True)
    with open(record_path, "w") as f:
        json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
