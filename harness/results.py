"""Results in xfstests' layout and words.

results/<section>/<case-id>.<stack>-<underlay>.full   the case's log, always
                 /<...>.out.bad                        what went wrong, on failure
                 /<...>.dmesg                          the kernel log, on failure
                 /check.log                            one block appended per run
                 /check.time                           last duration of each case
                 /result.xml                           JUnit, one testcase per case x stack x underlay
"""

import datetime
import json
import os
import re
import socket
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

PASS, FAIL, NOTRUN, XFAIL = "pass", "fail", "notrun", "xfail"
# Failed at a step whose rule no kernel release keeps yet (harness/errseq.py): shown, not a failure.
KNOWN_GAP = "knowngap"
# How result.xml tells outcomes that JUnit has no word for: <skipped type=...>.
SKIP_TYPES = {XFAIL: "expected-failure", KNOWN_GAP: "known-gap"}


@dataclass
class CaseResult:
    case_id: str
    param: str            # "<stack>-<underlay>"
    outcome: str          # PASS, FAIL, NOTRUN, XFAIL or KNOWN_GAP
    duration: float = 0.0
    reason: str = ""      # not-run, expected-failure or known-gap reason; failure summary
    title: str = ""
    bug: str = ""
    groups: tuple = ()
    stack: str = ""
    underlay: str = ""
    full: str = ""        # the case's log
    out_bad: str = ""     # failure details
    dmesg: str = ""       # kernel log during the case
    repro: str = ""       # a failure's reproduction script (harness/repro.py)
    properties: dict = field(default_factory=dict)

    @property
    def name(self):
        return f"{self.case_id}[{self.param}]" if self.param else self.case_id

    @property
    def stem(self):
        return f"{self.case_id}.{self.param}" if self.param else self.case_id


def unusable(results_dir):
    """Why results cannot be written under results_dir, or None."""
    try:
        os.makedirs(results_dir, exist_ok=True)
        probe = os.path.join(results_dir, f".stackcheck-write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.unlink(probe)
    except OSError as e:
        return f"cannot write results to {results_dir}: {e.strerror}"
    return None


class Results:
    def __init__(self, results_dir, section, kernel, probe=None):
        self.section = section
        self.kernel = kernel
        self.probe = probe
        self.dir = os.path.join(results_dir, section)
        os.makedirs(self.dir, exist_ok=True)
        self.cases = []
        self.started = datetime.datetime.now()
        self._times_path = os.path.join(self.dir, "check.time")
        try:
            with open(self._times_path) as f:
                self._last_times = json.load(f)
        except (OSError, ValueError):
            self._last_times = {}

    def path(self, result, suffix):
        return os.path.join(self.dir, result.stem + suffix)

    def last_duration(self, name):
        return self._last_times.get(name)

    def add(self, result):
        """Record one finished case and write its files."""
        self.cases.append(result)
        os.makedirs(os.path.dirname(self.path(result, ".full")), exist_ok=True)
        with open(self.path(result, ".full"), "w") as f:
            f.write(result.full)
        for suffix, text in ((".out.bad", result.out_bad), (".dmesg", result.dmesg), (".repro.py", result.repro)):
            path = self.path(result, suffix)
            if result.outcome == FAIL and text:
                with open(path, "w") as f:
                    f.write(text)
            elif os.path.exists(path):  # left by an earlier run of the case
                os.unlink(path)

    def by_outcome(self, outcome):
        return [c for c in self.cases if c.outcome == outcome]

    def summary_lines(self):
        return summary_lines(self.section, self.cases)

    def run_properties(self):
        props = {"section": self.section, "kernel": self.kernel}
        if self.probe is not None:
            for name, entry in sorted(self.probe.features.items()):
                props[f"probe.{name}"] = "yes" if entry["ok"] else f"no: {entry['detail']}"
            for module, line in zip(self.probe.modules, self.probe.module_lines()):
                props[f"module.{module['name']}"] = line
        return props

    def finish(self, interrupted=False):
        """Write check.log, check.time and result.xml for the whole run."""
        ended = datetime.datetime.now()
        with open(os.path.join(self.dir, "check.log"), "a") as f:
            f.write(f"{ended:%a %b %d %H:%M:%S %Y}\n")
            if interrupted:
                f.write("Interrupted!\n")
            f.write("\n".join(self.summary_lines()[1:]) + "\n")
        times = dict(self._last_times)
        times.update({c.name: round(c.duration, 3) for c in self.cases if c.outcome != NOTRUN})
        with open(self._times_path, "w") as f:
            json.dump(times, f, indent=0, sort_keys=True)
        write_xml(os.path.join(self.dir, "result.xml"), self.section, self.run_properties(), self.cases,
                  self.started, ended)


def summary_lines(section, cases):
    """xfstests' closing lines over a list of CaseResult."""
    def names(outcome):
        return " ".join(c.name for c in cases if c.outcome == outcome)
    ran = [c for c in cases if c.outcome != NOTRUN]
    failed = [c for c in cases if c.outcome == FAIL]
    gaps = [c for c in cases if c.outcome == KNOWN_GAP]
    lines = [f"SECTION       -- {section}", "Ran: " + " ".join(c.name for c in ran)]
    for label, outcome in (("Not run", NOTRUN), ("Expected failures", XFAIL), ("Known gaps", KNOWN_GAP)):
        if names(outcome):
            lines.append(f"{label}: {names(outcome)}")
    for label, prop in (("Known gaps closed", "gap closed"), ("Flaky", "flaky")):
        marked = " ".join(c.name for c in cases if c.properties.get(prop))
        if marked:
            lines.append(f"{label}: {marked}")
    known = f" ({len(gaps)} known gaps, listed above)" if gaps else ""
    if failed:
        lines.append("Failures: " + names(FAIL))
        lines.append(f"Failed {len(failed)} of {len(ran)} tests{known}")
    else:
        lines.append(f"Passed all {len(ran) - len(gaps)} tests{known}")
    return lines


def write_xml(path, section, run_properties, cases, started, ended):
    """JUnit XML: one testcase per case x stack x underlay; the run's facts as properties."""
    count = {o: sum(1 for c in cases if c.outcome == o) for o in (FAIL, NOTRUN, XFAIL, KNOWN_GAP)}
    suite = ET.Element("testsuite", {
        "name": "stackcheck", "hostname": socket.gethostname(),
        "timestamp": started.isoformat(timespec="seconds"),
        "time": f"{(ended - started).total_seconds():.3f}",
        "tests": str(len(cases)), "failures": str(count[FAIL]),
        "skipped": str(count[NOTRUN] + count[XFAIL] + count[KNOWN_GAP]), "errors": "0"})
    props = ET.SubElement(suite, "properties")
    for name, value in run_properties.items():
        ET.SubElement(props, "property", {"name": name, "value": str(value)})
    for c in cases:
        case = ET.SubElement(suite, "testcase", {
            "classname": f"stackcheck.{section}", "name": c.name, "time": f"{c.duration:.3f}"})
        cprops = ET.SubElement(case, "properties")
        for name, value in (("case", c.case_id), ("title", c.title), ("stack", c.stack), ("underlay", c.underlay),
                            ("groups", " ".join(c.groups)), ("bug", c.bug), *c.properties.items()):
            if value:
                ET.SubElement(cprops, "property", {"name": name, "value": str(value)})
        if c.outcome == NOTRUN:
            ET.SubElement(case, "skipped", {"message": c.reason})
        elif c.outcome in SKIP_TYPES:
            ET.SubElement(case, "skipped", {"type": SKIP_TYPES[c.outcome], "message": c.reason})
        elif c.outcome == FAIL:
            failure = ET.SubElement(case, "failure", {"message": c.reason.splitlines()[0] if c.reason else "failed"})
            failure.text = c.out_bad
        ET.SubElement(case, "system-out").text = c.stem + ".full"
    _xml_safe(suite)
    ET.indent(suite)
    ET.ElementTree(suite).write(path, encoding="utf-8", xml_declaration=True)


_NOT_XML = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _xml_safe(root):
    """Characters XML 1.0 cannot hold (a stack that returned NULs, a program's escape
    sequences) written as \\xNN, so that result.xml stays readable by every tool."""
    def safe(text):
        return _NOT_XML.sub(lambda m: f"\\x{ord(m.group()):02x}", text) if text else text
    for element in root.iter():
        element.text = safe(element.text)
        element.attrib.update({k: safe(v) for k, v in element.attrib.items()})


def read_xml(path):
    """(run properties, [CaseResult]) from a result.xml that stackcheck wrote."""
    suite = ET.parse(path).getroot()
    if suite.tag == "testsuites":
        suite = suite.find("testsuite")
    run_props = {p.get("name"): p.get("value") for p in suite.findall("properties/property")}
    cases = []
    for tc in suite.iter("testcase"):
        props = {p.get("name"): p.get("value") for p in tc.findall("properties/property")}
        name = tc.get("name")
        param = name[name.index("[") + 1:-1] if "[" in name else ""
        skipped, failure = tc.find("skipped"), tc.find("failure")
        if failure is not None:
            outcome, reason, out_bad = FAIL, failure.get("message", ""), failure.text or ""
        elif skipped is not None:
            outcome = {kind: o for o, kind in SKIP_TYPES.items()}.get(skipped.get("type"), NOTRUN)
            reason, out_bad = skipped.get("message", ""), ""
        else:
            outcome, reason, out_bad = PASS, "", ""
        known = {"case", "title", "stack", "underlay", "groups", "bug"}
        cases.append(CaseResult(
            case_id=props.get("case", name.split("[")[0]), param=param, outcome=outcome,
            duration=float(tc.get("time", 0)), reason=reason, bug=props.get("bug", ""), title=props.get("title", ""),
            groups=tuple(props.get("groups", "").split()), stack=props.get("stack", ""),
            underlay=props.get("underlay", ""), out_bad=out_bad,
            properties={k: v for k, v in props.items() if k not in known}))
    return run_props, cases


def find_xml(path):
    """A result.xml given as itself, a section directory, or a results directory
    with one section."""
    if os.path.isfile(path):
        return path
    direct = os.path.join(path, "result.xml")
    if os.path.isfile(direct):
        return direct
    found = sorted(os.path.join(path, d, "result.xml") for d in os.listdir(path)
                   if os.path.isfile(os.path.join(path, d, "result.xml"))) if os.path.isdir(path) else []
    if len(found) != 1:
        raise ValueError(f"{path}: " + ("no result.xml" if not found else
                                        f"{len(found)} sections; name one: {', '.join(found)}"))
    return found[0]
