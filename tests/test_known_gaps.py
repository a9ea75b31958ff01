"""Known gaps: rules no kernel release keeps yet (harness/errseq.py) are shown, never
hidden, and never counted as regressions; a kernel that keeps one is said to close it."""

import os

from harness import baseline
from harness import results as res

ONE_STACK = ("--stack", "overlay", "--underlay", "tmpfs")


def case(name, outcome, **properties):
    case_id, param = name.split("[")
    return res.CaseResult(case_id=case_id, param=param.rstrip("]"), outcome=outcome, properties=properties)


def test_baseline_comparison_of_known_gaps():
    before = [case("s/1[o-x]", res.KNOWN_GAP), case("s/2[o-x]", res.PASS), case("s/3[o-x]", res.KNOWN_GAP),
              case("s/4[o-x]", res.KNOWN_GAP), case("s/5[o-x]", res.FAIL)]
    after = [case("s/1[o-x]", res.PASS), case("s/2[o-x]", res.KNOWN_GAP), case("s/3[o-x]", res.KNOWN_GAP),
             case("s/4[o-x]", res.FAIL), case("s/5[o-x]", res.KNOWN_GAP), case("s/6[o-x]", res.PASS, **{"gap closed": "why"})]
    c = baseline.compare(before, after)
    assert c.gaps_closed == ["s/1[o-x]", "s/6[o-x]"]
    assert c.regressions == ["s/2[o-x]", "s/4[o-x]"]  # a closed gap open again; a failure at another step
    assert c.gaps_open == ["s/3[o-x]", "s/5[o-x]"]
    assert "Known gaps closed: s/1[o-x] s/6[o-x]" in c.lines()
    assert "Known gaps, still open: s/3[o-x] s/5[o-x]" in c.lines()
    assert not baseline.compare(before, before).failed


def test_a_pass_under_a_gap_rule_closes_the_gap(check):
    """selftest/011 holds overlayfs to the syncfs rule no release keeps yet, and passes:
    the run says the gap is closed, in its lines and in result.xml."""
    done = check("selftest/011", *ONE_STACK, selftest=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[known gap closed: " in done.stdout
    assert "Known gaps closed: selftest/011[overlay-tmpfs]" in done.stdout
    _, cases = res.read_xml(os.path.join(check.section_dir(), "result.xml"))
    assert "ovl_sync_fs" in cases[0].properties["gap closed"]
    full = open(os.path.join(check.section_dir(), "selftest", "011.overlay-tmpfs.full")).read()
    assert "rule syncfs on overlay" in full
