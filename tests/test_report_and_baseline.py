"""Comparing runs, merging shards, expunge lists, flaky reruns and the HTML report."""

import os
import shutil
import subprocess
from html.parser import HTMLParser

import pytest

from harness import baseline, expunge
from harness import results as res

ONE_STACK = ("--stack", "overlay", "--underlay", "tmpfs")


def case(name, outcome, reason=""):
    case_id, param = name.split("[")
    return res.CaseResult(case_id=case_id, param=param.rstrip("]"), outcome=outcome, reason=reason)


def test_compare_sorts_every_kind_of_difference():
    before = [case("a/1[s-x]", res.PASS), case("a/2[s-x]", res.FAIL), case("a/3[s-x]", res.FAIL),
              case("a/4[s-x]", res.PASS), case("a/5[s-x]", res.XFAIL), case("a/6[s-x]", res.PASS)]
    after = [case("a/1[s-x]", res.FAIL), case("a/2[s-x]", res.PASS), case("a/3[s-x]", res.FAIL),
             case("a/4[s-x]", res.NOTRUN, "kernel has no shiftfs"), case("a/5[s-x]", res.FAIL),
             case("a/7[s-x]", res.FAIL), case("a/8[s-x]", res.PASS)]
    c = baseline.compare(before, after)
    assert c.regressions == ["a/1[s-x]", "a/5[s-x]"]
    assert c.fixed == ["a/2[s-x]"]
    assert c.still_failing == ["a/3[s-x]"]
    assert c.newly_not_run == [("a/4[s-x]", "kernel has no shiftfs")]
    assert c.new_cases == ["a/7[s-x]", "a/8[s-x]"] and c.new_failures == ["a/7[s-x]"]
    assert c.gone == ["a/6[s-x]"]
    assert c.failed
    assert not baseline.compare(before, before).failed


def test_baseline_run_exits_1_only_for_regressions(check):
    """Two real runs: the baseline passes selftest/001, the candidate fails it."""
    assert check("selftest/004", *ONE_STACK, selftest=True).returncode == 0
    first = check.section_dir()
    base = os.path.join(os.path.dirname(check.results), "baseline-results")
    shutil.copytree(check.results, base)
    # a still-failing case against a baseline where it failed too is not a regression
    done = check("selftest/004", *ONE_STACK, "--baseline", base, selftest=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Regressions: none" in done.stdout
    # make the baseline say selftest/001 passed: its failure now is a regression
    props, cases = res.read_xml(os.path.join(first, "result.xml"))
    cases.append(res.CaseResult(case_id="selftest/001", param="overlay-tmpfs", outcome=res.PASS))
    import datetime
    now = datetime.datetime.now()
    xml = os.path.join(base, os.path.basename(first), "result.xml")
    res.write_xml(xml, props["section"], props, cases, now, now)
    done = check("selftest/001", "selftest/004", *ONE_STACK, "--baseline", xml, selftest=True)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Regressions: selftest/001[overlay-tmpfs]" in done.stdout
    standalone = subprocess.run([os.sys.executable, "-m", "harness.baseline", "compare", xml, check.results],
                                capture_output=True, text=True)
    assert standalone.returncode == 1 and "Regressions: selftest/001[overlay-tmpfs]" in standalone.stdout


def test_shards_are_even_and_merge_to_one_run(check, tmp_path):
    args = ("-g", "quick", "--underlay", "tmpfs", "--stack", "overlay*")
    whole = check(*args, "--section", "whole")
    assert whole.returncode == 0, whole.stdout + whole.stderr
    parts = []
    for i in (1, 2, 3):
        done = check(*args, "--shard", f"{i}/3", "--section", f"shard{i}")
        assert done.returncode == 0, done.stdout + done.stderr
        parts.append(os.path.join(check.results, f"shard{i}", "result.xml"))
    sizes = [len(res.read_xml(p)[1]) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    names = [c.name for p in parts for c in res.read_xml(p)[1]]
    assert len(names) == len(set(names))
    merged = str(tmp_path / "merged.xml")
    lines = baseline.merge(parts, merged)
    _, whole_cases = res.read_xml(os.path.join(check.results, "whole", "result.xml"))
    assert lines[1:] == res.summary_lines("whole", sorted(whole_cases, key=lambda c: (c.case_id, c.param)))[1:]


def test_expunged_cases_are_not_run_with_the_lists_reason(check, tmp_path):
    listing = tmp_path / "expunge.txt"
    listing.write_text("# why\nselftest/00[14] stack=overlay underlay=tmpfs kernel>=3.0 : known bug (https://example.invalid/1)\n")
    done = check("selftest/001", "selftest/004", *ONE_STACK, "--expunge", str(listing), selftest=True)
    assert done.returncode == 0, done.stdout + done.stderr
    reason = "expunged: known bug (https://example.invalid/1) (expunge.txt:2)"
    assert f"[not run] {reason}" in done.stdout
    _, cases = res.read_xml(os.path.join(check.section_dir(), "result.xml"))
    assert {c.name: c.reason for c in cases} == {"selftest/001[overlay-tmpfs]": reason,
                                                 "selftest/004[overlay-tmpfs]": reason}


def test_expunge_kernel_ranges(tmp_path):
    listing = tmp_path / "e.txt"
    listing.write_text("stack/0* stack=overlay* kernel>=5.11 kernel<6.1 : volatile rules changed\n")
    entries = expunge.parse(str(listing))
    assert expunge.reason_for(entries, "stack/010", "overlay_volatile", "ext4", "5.15.0-91-generic")
    assert not expunge.reason_for(entries, "stack/010", "overlay_volatile", "ext4", "6.1.0-18-amd64")
    assert not expunge.reason_for(entries, "stack/010", "idmapped", "ext4", "5.15.0")
    listing.write_text("stack/001 colour=red : nope\n")
    with pytest.raises(expunge.ExpungeError, match="e.txt:1"):
        expunge.parse(str(listing))


def test_a_case_that_passes_on_a_rerun_is_flaky(check, run_base):
    marker = os.path.join(run_base, "flaky-marker")
    check.env["STACKCHECK_SELFTEST_FLAKY"] = marker
    done = check("selftest/007", *ONE_STACK, "-C", "2", selftest=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Flaky: selftest/007[overlay-tmpfs]" in done.stdout
    _, cases = res.read_xml(os.path.join(check.section_dir(), "result.xml"))
    assert cases[0].properties["flaky"] == "passed on attempt 2"


class _Cells(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links, self.cases = [], []
        self._in_case = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "a":
            self.links.append(attrs)
        self._in_case = tag == "td" and attrs.get("class") == "case"

    def handle_data(self, data):
        if self._in_case and data.strip():
            self.cases.append(data.strip())


def test_report_shows_the_matrix_with_working_links(check):
    check("selftest/001", "selftest/002", "selftest/004", *ONE_STACK, selftest=True)
    page = os.path.join(check.section_dir(), "report.html")
    parser = _Cells()
    with open(page) as f:
        text = f.read()
    parser.feed(text)
    assert parser.cases == ["selftest/001", "selftest/002", "selftest/004"]
    outcomes = {a["class"] for a in parser.links if "class" in a}
    assert {"o fail", "o notrun", "o pass"} <= outcomes
    for link in parser.links:
        assert os.path.exists(os.path.join(check.section_dir(), link["href"])), link
    assert any(link["href"].endswith(".out.bad") for link in parser.links)
    assert "http" not in text.replace("https://bugs.launchpad.net", "")  # nothing fetched


def test_report_renders_in_a_real_browser(check, tmp_path):
    browser = shutil.which("chromium")
    if not browser:
        pytest.skip("chromium is not installed (Debian package chromium)")
    check("selftest/001", "selftest/004", *ONE_STACK, selftest=True)
    shot = str(tmp_path / "report.png")
    done = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                           "--no-first-run", "--disable-background-networking", "--disable-component-update",
                           "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,600",
                           f"--screenshot={shot}", "file://" + os.path.join(check.section_dir(), "report.html")],
                          capture_output=True, text=True, timeout=120)
    assert os.path.getsize(shot) > 5000, done.stderr
