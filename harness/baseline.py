"""Comparing runs: does a candidate kernel still pass what the last one passed?

    python -m harness.baseline compare BASELINE CANDIDATE   (result.xml files or results dirs)
    python -m harness.baseline merge -o OUT.xml SHARD.xml...
    python -m harness.baseline summary RESULT.xml

compare exits 1 only for regressions (passed before, fails now, or now shows
a known gap it had closed) and for failures of cases the baseline did not
have; a fix, a known gap closed or still open, a case still failing or a case
now not run is reported, not failed.  merge joins the result.xml files of
shards (or of any runs over disjoint cases) into one, whose summary is the one
a single run would have printed.
"""

import argparse
import datetime
import sys
from dataclasses import dataclass, field

from harness import results as res

OK = (res.PASS, res.XFAIL)


@dataclass
class Comparison:
    regressions: list = field(default_factory=list)
    fixed: list = field(default_factory=list)
    gaps_closed: list = field(default_factory=list)
    gaps_open: list = field(default_factory=list)
    still_failing: list = field(default_factory=list)
    newly_not_run: list = field(default_factory=list)  # (name, reason)
    new_cases: list = field(default_factory=list)
    new_failures: list = field(default_factory=list)
    gone: list = field(default_factory=list)

    @property
    def failed(self):
        return bool(self.regressions or self.new_failures)

    def lines(self):
        out = []
        for label, names in (("Regressions", self.regressions), ("Failures of new cases", self.new_failures),
                             ("Fixed", self.fixed), ("Known gaps closed", self.gaps_closed),
                             ("Known gaps, still open", self.gaps_open), ("Still failing", self.still_failing),
                             ("New cases", self.new_cases), ("No longer in the run", self.gone)):
            if names:
                out.append(f"{label}: {' '.join(names)}")
        if self.newly_not_run:
            out.append("Newly not run: " + "; ".join(f"{n} ({why})" for n, why in self.newly_not_run))
        out.append("Regressions: none" if not self.failed else
                   f"{len(self.regressions)} regressions, {len(self.new_failures)} failures of new cases")
        return out


def compare(baseline_cases, candidate_cases):
    before = {c.name: c for c in baseline_cases}
    after = {c.name: c for c in candidate_cases}
    result = Comparison()
    for name, new in after.items():
        old = before.get(name)
        if old is None:
            result.new_cases.append(name)
            if new.outcome == res.FAIL:
                result.new_failures.append(name)
            elif new.properties.get("gap closed"):
                result.gaps_closed.append(name)
        elif new.outcome == res.FAIL:
            (result.still_failing if old.outcome == res.FAIL else
             result.regressions if old.outcome in OK + (res.KNOWN_GAP,) else result.new_failures).append(name)
        elif new.outcome == res.KNOWN_GAP:
            (result.regressions if old.outcome == res.PASS else result.gaps_open).append(name)
        elif new.outcome in OK and old.outcome == res.FAIL:
            result.fixed.append(name)
        elif new.outcome in OK and old.outcome == res.KNOWN_GAP:
            result.gaps_closed.append(name)
        elif new.outcome == res.NOTRUN and old.outcome != res.NOTRUN:
            result.newly_not_run.append((name, new.reason))
    result.gone = sorted(set(before) - set(after))
    return result


def compare_files(baseline, candidate):
    """Compare two results (result.xml, section or results directory); lines and the verdict."""
    base_path, cand_path = res.find_xml(baseline), res.find_xml(candidate)
    base_props, base_cases = res.read_xml(base_path)
    cand_props, cand_cases = res.read_xml(cand_path)
    comparison = compare(base_cases, cand_cases)
    head = (f"Baseline: {base_path} (kernel {base_props.get('kernel', '?')}) -> "
            f"{cand_path} (kernel {cand_props.get('kernel', '?')})")
    return [head] + module_differences(base_props, cand_props) + comparison.lines(), comparison


def module_differences(base_props, cand_props):
    """Lines for the modules under test (result.xml's module.* properties) that
    differ between the runs: their code is part of what was compared."""
    def modules(props):
        return {k.removeprefix("module."): v for k, v in props.items() if k.startswith("module.")}
    before, after = modules(base_props), modules(cand_props)
    own = "the kernel's own"
    return [f"Module {name} differs: baseline: {before.get(name, own)}; candidate: {after.get(name, own)}"
            for name in sorted(set(before) | set(after)) if before.get(name) != after.get(name)]


def merge(paths, out):
    """Join result.xml files into out; returns the merged summary lines."""
    cases, props, sections = {}, {}, []
    for path in paths:
        run_props, run_cases = res.read_xml(path)
        props = props or run_props
        sections.append(run_props.get("section", "?"))
        for case in run_cases:
            cases[case.name] = case
    section = sections[0] if len(set(sections)) == 1 else "+".join(sorted(set(sections)))
    merged = sorted(cases.values(), key=lambda c: (c.case_id, c.param))
    now = datetime.datetime.now()
    res.write_xml(out, section, dict(props, section=section), merged, now, now)
    return res.summary_lines(section, merged)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m harness.baseline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compare", help="compare a candidate run with a baseline")
    c.add_argument("baseline")
    c.add_argument("candidate")
    m = sub.add_parser("merge", help="merge result.xml files of shards")
    m.add_argument("-o", "--output", required=True)
    m.add_argument("inputs", nargs="+")
    s = sub.add_parser("summary", help="the closing lines of a result.xml")
    s.add_argument("xml")
    args = p.parse_args(argv)
    try:
        if args.command == "compare":
            lines, comparison = compare_files(args.baseline, args.candidate)
            print("\n".join(lines))
            return 1 if comparison.failed else 0
        if args.command == "merge":
            print("\n".join(merge([res.find_xml(i) for i in args.inputs], args.output)))
            return 0
        props, cases = res.read_xml(res.find_xml(args.xml))
        print("\n".join(res.summary_lines(props.get("section", "?"), cases)))
        return 0
    except (OSError, ValueError, SyntaxError) as e:  # ElementTree's ParseError is a SyntaxError
        print(f"baseline: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
