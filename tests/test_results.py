"""The results module: xfstests' files and words, and JUnit."""

import os
import xml.etree.ElementTree as ET

from harness import results as res
from harness.probe import Probe


def make(tmp_path):
    probe = Probe("6.1.0-test", ["ext4"])
    probe.set("shiftfs", False, "kernel has no shiftfs")
    return res.Results(str(tmp_path / "results"), "sec", probe.kernel, probe)


def case(outcome, case_id="stack/001", param="overlay-ext4", **kw):
    return res.CaseResult(case_id=case_id, param=param, outcome=outcome, full=f"log of {case_id}\n",
                          stack=param.split("-")[0], underlay=param.split("-")[1], **kw)


def test_files_per_outcome(tmp_path):
    r = make(tmp_path)
    r.add(case(res.PASS))
    r.add(case(res.FAIL, "stack/002", out_bad="S1.2: expected success, got ESTALE\n", reason="S1.2: ESTALE",
               dmesg="[ 1.0] WARNING: x\n"))
    r.add(case(res.NOTRUN, "stack/003", "shiftfs-ext4", reason="kernel has no shiftfs"))
    base = os.path.join(str(tmp_path), "results", "sec", "stack")
    assert sorted(os.listdir(base)) == ["001.overlay-ext4.full", "002.overlay-ext4.dmesg",
                                        "002.overlay-ext4.full", "002.overlay-ext4.out.bad",
                                        "003.shiftfs-ext4.full"]


def test_summary_lines_in_xfstests_words(tmp_path):
    r = make(tmp_path)
    r.add(case(res.PASS))
    r.add(case(res.NOTRUN, "stack/003", "shiftfs-ext4", reason="kernel has no shiftfs"))
    assert r.summary_lines()[1:] == ["Ran: stack/001[overlay-ext4]", "Not run: stack/003[shiftfs-ext4]",
                                     "Passed all 1 tests"]
    r.add(case(res.FAIL, "stack/002", reason="boom", out_bad="boom"))
    r.add(case(res.XFAIL, "stack/010", reason="undefined"))
    assert r.summary_lines()[-3:] == ["Expected failures: stack/010[overlay-ext4]",
                                      "Failures: stack/002[overlay-ext4]", "Failed 1 of 3 tests"]


def test_result_xml(tmp_path):
    r = make(tmp_path)
    r.add(case(res.PASS, duration=0.5, title="t", bug="LP#1"))
    r.add(case(res.FAIL, "stack/002", reason="S1.2: ESTALE", out_bad="details"))
    r.add(case(res.NOTRUN, "stack/003", "shiftfs-ext4", reason="kernel has no shiftfs"))
    r.add(case(res.XFAIL, "stack/010", reason="undefined on overlay"))
    r.finish()
    suite = ET.parse(os.path.join(r.dir, "result.xml")).getroot()
    assert (suite.get("tests"), suite.get("failures"), suite.get("skipped")) == ("4", "1", "2")
    props = {p.get("name"): p.get("value") for p in suite.find("properties")}
    assert props["kernel"] == "6.1.0-test"
    assert props["probe.shiftfs"] == "no: kernel has no shiftfs"
    cases = {tc.get("name"): tc for tc in suite.iter("testcase")}
    assert cases["stack/002[overlay-ext4]"].find("failure").text == "details"
    assert cases["stack/003[shiftfs-ext4]"].find("skipped").get("message") == "kernel has no shiftfs"
    assert cases["stack/010[overlay-ext4]"].find("skipped").get("type") == "expected-failure"
    case_props = {p.get("name"): p.get("value") for p in cases["stack/001[overlay-ext4]"].find("properties")}
    assert case_props == {"case": "stack/001", "title": "t", "stack": "overlay", "underlay": "ext4", "bug": "LP#1"}


def test_check_log_appends_and_times_are_remembered(tmp_path):
    first = make(tmp_path)
    first.add(case(res.PASS, duration=1.25))
    first.finish()
    second = make(tmp_path)
    assert second.last_duration("stack/001[overlay-ext4]") == 1.25
    second.add(case(res.FAIL, out_bad="now it fails", reason="x"))
    second.finish()
    third = make(tmp_path)
    third.add(case(res.PASS))
    third.finish()
    with open(os.path.join(third.dir, "check.log")) as f:
        log = f.read()
    assert log.count("Ran: stack/001[overlay-ext4]") == 3
    assert not os.path.exists(os.path.join(third.dir, "stack", "001.overlay-ext4.out.bad"))


def test_unusable_results_dir(tmp_path):
    assert res.unusable(str(tmp_path / "fine")) is None
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert res.unusable(str(blocker / "sub")).startswith(f"cannot write results to {blocker / 'sub'}")


def test_result_xml_holds_what_xml_cannot(tmp_path):
    """A stack that returned NULs, or a program's escape sequences, in a failure's
    message: result.xml stays well-formed and shows them escaped."""
    r = make(tmp_path)
    r.add(case(res.FAIL, "stack/002", reason="got b'\x00\x00' \x1b[7m", out_bad="content \x00\x01 seen"))
    r.finish()
    suite = ET.parse(os.path.join(r.dir, "result.xml")).getroot()
    failure = next(suite.iter("testcase")).find("failure")
    assert (failure.get("message"), failure.text) == ("got b'\\x00\\x00' \\x1b[7m", "content \\x00\\x01 seen")


GAP = "S5.1 syncfs: expected EIO, got success [known gap, no kernel release is known to keep this yet: why]"


def test_known_gaps_are_listed_apart_and_fail_nothing(tmp_path):
    r = make(tmp_path)
    r.add(case(res.PASS))
    r.add(case(res.KNOWN_GAP, "stack/042", reason=GAP))
    r.add(case(res.PASS, "stack/043", properties={"gap closed": "why"}))
    assert r.summary_lines()[1:] == [
        "Ran: stack/001[overlay-ext4] stack/042[overlay-ext4] stack/043[overlay-ext4]",
        "Known gaps: stack/042[overlay-ext4]", "Known gaps closed: stack/043[overlay-ext4]",
        "Passed all 2 tests (1 known gaps, listed above)"]
    assert not os.path.exists(r.path(r.cases[1], ".out.bad"))
    r.finish()
    _, cases = res.read_xml(os.path.join(r.dir, "result.xml"))
    gap = next(c for c in cases if c.case_id == "stack/042")
    assert (gap.outcome, gap.reason) == (res.KNOWN_GAP, GAP)
    assert next(c for c in cases if c.case_id == "stack/043").properties["gap closed"] == "why"
