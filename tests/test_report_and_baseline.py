"""Comparing runs, merging shards, expunge lists, flaky reruns and the HTML report."""

import html
import json
import os
import re
import shutil
import subprocess
import urllib.parse
from html.parser import HTMLParser

import pytest

from harness import baseline, bootstrap, expunge, report
from harness import results as res

from conftest import CHECK_LIMIT, waits_for

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


@waits_for(CHECK_LIMIT, CHECK_LIMIT, CHECK_LIMIT)
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


@waits_for(CHECK_LIMIT, CHECK_LIMIT, CHECK_LIMIT, CHECK_LIMIT)  # the whole, then each of 3 shards
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
        self.links, self.cases, self.ids = [], [], set()
        self._in_case = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "a":
            self.links.append(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
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
        if link["href"].startswith("#"):  # a failing cell, from the summary above the matrix
            assert urllib.parse.unquote(link["href"][1:]) in parser.ids, link
        else:
            assert os.path.exists(os.path.join(check.section_dir(), link["href"])), link
    first = parser.links[0]  # the failing cell, linked from its stack and underlay's summary row, with why
    assert first["href"] == "#selftest/001%5Boverlay-tmpfs%5D" and first["class"] == "o fail", first
    assert first["title"].startswith("FAIL: ") and "ENOENT" in first["title"], first
    assert any(link["href"].endswith(".out.bad") for link in parser.links)
    assert "http" not in text.replace("https://bugs.launchpad.net", "")  # nothing fetched


def test_self_test_packages_are_installed_for_the_self_test_only():
    project = bootstrap._project()
    for_cases = bootstrap.wanted_packages(project, ["-g", "quick"])
    for_self_test = bootstrap.wanted_packages(project, ["--self-test", "-k", "browser"])
    assert for_self_test[0] == for_cases[0] and for_self_test[1] == {"chromium": "chromium"}
    assert "chromium" not in [pkg for table in for_cases for pkg in table.values()]


CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")
SCREEN = (1280, 800)

# Injected into a copy of the report: what a reader sees on the first screen, and after
# one click on the failing cell's link; the answer lands in <body data-check>.
CHECK_SCRIPT = """<script>
const name = %(name)s, caseId = %(case)s, gapName = %(gap)s;
const inView = (r) => r.top >= 0 && r.left >= 0 && r.bottom <= innerHeight && r.right <= innerWidth;
const links = [...document.querySelectorAll("table.summary a")];
const link = links.find(a => decodeURIComponent(a.hash) === "#" + name), cell = document.getElementById(name);
const gap = document.getElementById(gapName), gapLink = links.find(a => decodeURIComponent(a.hash) === "#" + gapName);
const found = {screen: [innerWidth, innerHeight], gap_colour: getComputedStyle(gap.querySelector("a.o")).backgroundColor,
               gap_linked_from_the_summary: !!gapLink,
               link_on_first_screen: !!link && link.textContent === caseId && inView(link.getBoundingClientRect()),
               cell_on_first_screen: inView(cell.getBoundingClientRect())};
if (link) link.click();
const at = cell.getBoundingClientRect();
const head = document.querySelector("table.matrix thead").getBoundingClientRect();
const caseCell = cell.parentElement.querySelector("td.case"), caseAt = caseCell.getBoundingClientRect();
Object.assign(found, {
  cell_targeted: document.querySelector(":target") === cell, cell_in_view_after_click: inView(at),
  header_row_at_top: Math.abs(head.top) < 1, cell_below_header_row: at.top >= head.bottom - 1,
  case_column_at_left: Math.abs(caseAt.left) < 1 && caseCell.textContent === caseId,
  cell_right_of_case_column: at.left >= caseAt.right - 1, scrolled: [scrollX, scrollY],
  cell_at: [at.left, at.top], header_row_bottom: head.bottom, case_column_right: caseAt.right});
document.body.setAttribute("data-check", JSON.stringify(found));
</script></body>"""


def _rgb(colour):
    """#rrggbb as a browser's computed style says it."""
    return "rgb({}, {}, {})".format(*(int(colour[i:i + 2], 16) for i in (1, 3, 5)))


def _chromium():
    """Chromium, which ./check --self-test installs; missing, a skip says why (a failure in CI)."""
    browser = shutil.which("chromium")
    if browser:
        return browser
    why = f"chromium is not installed (Debian package chromium): {bootstrap.why_not_installed('chromium')}"
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        pytest.fail(why + "; CI runs this check", pytrace=False)
    pytest.skip(why)


def _browse(browser, profile, *args):
    done = subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                           f"--window-size={SCREEN[0]},{SCREEN[1]}", *args], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


FAILING = ("stack/020", "overlay_metacopy", "ext4")
KNOWN_GAP = ("stack/042", "overlay", "ext4")


def _red_run(results_dir):
    """A run of 44 cases on 30 stack x underlay columns (1,320 cells) whose one failure,
    FAILING, lies below and right of what a screen holds, with one known gap."""
    run = res.Results(results_dir, "6.18.0-test", "6.18.0-test")
    for n in range(44):
        case_id = f"stack/{n + 1:03d}"
        for stack in ("fuse-shift", "fuse-union", "idmapped", "overlay", "overlay_metacopy",
                      "overlay_volatile"):
            for fs in ("btrfs", "ext4", "ext4-zram", "tmpfs", "xfs"):
                outcome, reason, out_bad = res.PASS, "", ""
                if stack == "idmapped" and fs == "tmpfs":
                    outcome, reason = res.NOTRUN, "idmapped tmpfs: EINVAL"
                elif stack.startswith("overlay") and 10 <= n < 16:
                    outcome, reason = res.XFAIL, "changes to overlayfs' layers while mounted are undefined"
                elif (case_id, stack, fs) == KNOWN_GAP:
                    outcome, reason = res.KNOWN_GAP, "S5.1 F1: syncfs: expected EIO, got success [known gap: ...]"
                elif (case_id, stack, fs) == FAILING:
                    outcome = res.FAIL
                    reason = "S3 F1: read F after the rename: expected the new md5, got the old"
                    out_bad = reason + "\n"
                run.add(res.CaseResult(case_id=case_id, param=f"{stack}-{fs}", outcome=outcome, reason=reason,
                                       title=f"Scenario {n + 1} through the stack", bug="LP#1879196",
                                       stack=stack, underlay=fs, full=f"{case_id} on {stack} over {fs}\n",
                                       out_bad=out_bad))
    run.finish()
    return run.dir


def test_report_renders_in_a_real_browser(tmp_path):
    """After a red run the failing cell is one click from the first screen; the click
    brings it into view with the header row and the case column beside it."""
    browser = _chromium()
    section = _red_run(str(tmp_path / "results"))
    page = report.write(section, str(tmp_path / "results"))
    failing = f"{FAILING[0]}[{FAILING[1]}-{FAILING[2]}]"
    gap = f"{KNOWN_GAP[0]}[{KNOWN_GAP[1]}-{KNOWN_GAP[2]}]"
    with open(page) as f:
        text = f.read()
    checking = os.path.join(section, "report-check.html")  # beside it, so that relative links resolve
    with open(checking, "w") as f:
        f.write(text.replace("</body>", CHECK_SCRIPT % {"name": json.dumps(failing),
                                                         "case": json.dumps(FAILING[0]),
                                                         "gap": json.dumps(gap)}))
    shot = os.path.join(section, "report-check.png")
    _browse(browser, tmp_path / "profile", f"--screenshot={shot}", "file://" + page)
    dom = _browse(browser, tmp_path / "profile", "--dump-dom", "file://" + checking)
    found = re.search(r'data-check="([^"]*)"', dom)
    assert found, f"the check script did not run (screenshot of the first screen: {shot})"
    found = json.loads(html.unescape(found.group(1)))
    expected = {"link_on_first_screen": True, "cell_on_first_screen": False, "cell_targeted": True,
                "cell_in_view_after_click": True, "header_row_at_top": True, "cell_below_header_row": True,
                "case_column_at_left": True, "cell_right_of_case_column": True,
                "gap_colour": _rgb(report.OUTCOMES[1].colour), "gap_linked_from_the_summary": True}
    assert report.OUTCOMES[1].name == res.KNOWN_GAP  # a colour of its own, apart from failures'
    assert len({o.colour for o in report.OUTCOMES}) == len(report.OUTCOMES)
    assert {k: found[k] for k in expected} == expected, \
        f"report.html on a {found['screen']} screen: {found} (screenshot of the first screen: {shot})"
    assert os.path.getsize(shot) > 5000, shot
