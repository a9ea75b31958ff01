"""results/<section>/report.html: one self-contained page (no network) for a run.

Read top-down after a red run: each run's closing line and counts by outcome;
then one row per stack and underlay, those with failures first, with their
counts and the failing cells one click away; then the matrix of cases x stacks
x underlays (one mark per kernel when the results directory holds several
sections, or a baseline is given), coloured by outcome, with the bug each case
guards and links to each case's .full, .out.bad and .dmesg. The matrix keeps
its header rows and case column in view while it scrolls.
"""

import html
import os
import urllib.parse
from dataclasses import dataclass

from harness import results as res


@dataclass(frozen=True)
class Outcome:
    name: str       # the results' word (res.PASS, ...), also the CSS class
    label: str      # what the page says
    colour: str
    first: bool     # a reader after a red run looks at these first: listed and linked at the top


# In the order a reader wants them after a red run. A new outcome is one more entry.
OUTCOMES = (
    Outcome(res.FAIL, "FAIL", "#f28b82", first=True),
    Outcome(res.KNOWN_GAP, "known gap", "#f7b26a", first=True),  # no kernel keeps the rule yet (errseq)
    Outcome(res.XFAIL, "expected failure", "#fcd98a", first=False),
    Outcome(res.NOTRUN, "not run", "#ddd", first=False),
    Outcome(res.PASS, "pass", "#9be39b", first=False),
)
_BY_NAME = {o.name: o for o in OUTCOMES}


def _outcome(name):
    # An outcome the table does not know yet still shows, by its own word, among the first.
    return _BY_NAME.get(name) or Outcome(name, name, "#fff", first=True)


def _rank(name):
    return list(_BY_NAME).index(name) if name in _BY_NAME else len(_BY_NAME)


STYLE = """
body { font: 13px/1.4 sans-serif; margin: 1em 1.5em; color: #222; }
h1 { font-size: 18px; margin: 0 0 .4em; } h2 { font-size: 15px; margin: 1.2em 0 .4em; }
ul.runs { list-style: none; padding: 0; margin: 0; } ul.runs summary { cursor: pointer; }
table { border-collapse: separate; border-spacing: 0; }
th, td { border: solid #ccc; border-width: 0 1px 1px 0; padding: 2px 4px; vertical-align: top; }
tr > :first-child { border-left-width: 1px; } thead tr:first-child > * { border-top-width: 1px; }
th { background: #eef; text-align: left; } th.fs { background: #f6f6ff; font-weight: normal; }
.o { display: inline-block; margin: 1px 0; padding: 0 4px; border-radius: 3px; color: #000;
     text-decoration: none; font-size: 11px; white-space: nowrap; }
table.matrix td > a.o { display: block; } .flaky { outline: 2px dashed #b06000; }
table.summary td.n { text-align: right; min-width: 3em; } table.summary td.look { max-width: 60em; }
/* The matrix scrolls with the page; its header rows and case column stay in view, and a
   cell reached by a link stops clear of them. */
table.matrix thead { position: sticky; top: 0; z-index: 2; } table.matrix th { white-space: nowrap; }
table.matrix .case { position: sticky; left: 0; z-index: 1; min-width: 6.5em; white-space: nowrap; }
table.matrix td.case { background: #fff; font-weight: bold; }
table.matrix .title { min-width: 20em; max-width: 26em; } table.matrix td.title { font-size: 12px; }
table.matrix td[id] { scroll-margin: 5em 0 0 8em; }
table.matrix td:target { outline: 3px solid #1a4fd8; outline-offset: -2px; }
pre { background: #f7f7f7; padding: 6px; white-space: pre-wrap; }
"""


def _style():
    return STYLE + "".join(f".{o.name} {{ background: {o.colour}; }}\n" for o in OUTCOMES)


def _chip(outcome, text, title="", href=""):
    """text in the outcome's colour; a link when given href."""
    tag = "a" if href else "span"
    attrs = f' href="{html.escape(href)}"' if href else ""
    attrs += f' title="{html.escape(title)}"' if title else ""
    return f'<{tag} class="o {html.escape(outcome)}"{attrs}>{html.escape(text)}</{tag}>'


def _why(case):
    return _outcome(case.outcome).label + (f": {case.reason}" if case.reason else "")


def _sections(results_dir, extra_xml=()):
    """[(label, section dir or None, cases)] for every section, then the extra runs."""
    found = []
    for name in sorted(os.listdir(results_dir)) if os.path.isdir(results_dir) else []:
        xml = os.path.join(results_dir, name, "result.xml")
        if os.path.isfile(xml):
            props, cases = res.read_xml(xml)
            found.append((f"{name} (kernel {props.get('kernel', '?')})" if name != props.get("kernel") else name,
                          os.path.join(results_dir, name), cases))
    for xml in extra_xml:
        props, cases = res.read_xml(xml)
        found.append((f"baseline {props.get('section', '?')} (kernel {props.get('kernel', '?')})",
                      os.path.dirname(xml), cases))
    return found


def _short(label):
    return label.split(" (")[0]


def _anchor(case):
    """The matrix cell of a case on its stack and underlay: `report.html#stack/001[overlay-ext4]`."""
    return "#" + urllib.parse.quote(case.name, safe="/")


def _counts(cases):
    """Outcome -> count, in the table's order (outcomes it lacks after)."""
    names = sorted({o.name for o in OUTCOMES} | {c.outcome for c in cases}, key=lambda n: (_rank(n), n))
    return {name: sum(1 for c in cases if c.outcome == name) for name in names}


def _modules(section_dir):
    """The modules under test that the run loaded (result.xml's module.* properties):
    which code produced these results."""
    xml = os.path.join(section_dir or "", "result.xml")
    if not os.path.isfile(xml):
        return []
    props, _ = res.read_xml(xml)
    return [line for name, line in sorted(props.items()) if name.startswith("module.")]


def _runs(sections):
    out = ['<ul class="runs">']
    for label, directory, cases in sections:
        lines = res.summary_lines(label, cases)
        counts = _counts(cases).items()
        chips = " ".join(_chip(name, f"{_outcome(name).label} {n}") for name, n in counts if n)
        modules = "".join(f'<br><small class="module">module {html.escape(m)}</small>' for m in _modules(directory))
        out.append(f"<li><details><summary><b>{html.escape(label)}</b>: {html.escape(lines[-1])} {chips}"
                   f"{modules}</summary><pre>{html.escape(chr(10).join(lines[1:]))}</pre></details></li>")
    out.append("</ul>")
    return out


def _look_first(cases):
    """The cases a reader looks at first after a red run, in the table's order, then by case."""
    first = (c for c in cases if _outcome(c.outcome).first)
    return sorted(first, key=lambda c: (_rank(c.outcome), c.case_id))


def _count(name, n):
    marked = f" {html.escape(name)}" if n and _outcome(name).first else ""
    return f'<td class="n{marked}">{n or ""}</td>'


def _summary(sections, columns):
    """One row per stack and underlay (and section, when there are several): counts by
    outcome, and links to the cells a reader looks at first; those rows come first."""
    several = len(sections) > 1
    rows = []
    for label, _, cases in sections:
        for stack, fs in columns:
            here = [c for c in cases if (c.stack, c.underlay) == (stack, fs)]
            if here:
                rows.append((_short(label), stack, fs, here))
    rows.sort(key=lambda row: not _look_first(row[3]))  # stable: otherwise in the matrix's order
    names = list(_counts([c for *_, here in rows for c in here]))
    out = ['<table class="summary"><thead><tr><th>stack</th><th>underlay</th>'
           + ("<th>kernel</th>" if several else "")
           + "".join(f"<th>{_chip(name, _outcome(name).label)}</th>" for name in names)
           + "<th>look here first</th></tr></thead><tbody>"]
    for section, stack, fs, here in rows:
        counts = _counts(here)
        out.append(f"<tr><td>{html.escape(stack)}</td><td>{html.escape(fs)}</td>"
                   + (f"<td>{html.escape(section)}</td>" if several else "")
                   + "".join(_count(name, counts.get(name)) for name in names)
                   + '<td class="look">' + " ".join(_chip(c.outcome, c.case_id, _why(c), _anchor(c))
                                                    for c in _look_first(here)) + "</td></tr>")
    out.append("</tbody></table>")
    return out


def _cell(case, label, section_dir, here):
    classes = f"o {html.escape(case.outcome)}" + (" flaky" if case.properties.get("flaky") else "")
    target = os.path.relpath(os.path.join(section_dir, case.stem + ".full"), here)
    text = _outcome(case.outcome).label
    links = [f'<a class="{classes}" href="{html.escape(target)}" title="{html.escape(_why(case))}">'
             f"{html.escape(label) + ': ' if label else ''}{html.escape(text)}</a>"]
    for suffix in (".out.bad", ".dmesg"):
        path = os.path.join(section_dir, case.stem + suffix)
        if os.path.exists(path):
            links.append(f'<a class="o" href="{html.escape(os.path.relpath(path, here))}">{suffix[1:]}</a>')
    return "".join(links)


def _matrix(here, sections, columns):
    stacks_ = list(dict.fromkeys(s for s, _ in columns))
    rows = {}
    for label, section_dir, cases in sections:
        for c in cases:
            row = rows.setdefault(c.case_id, {"title": "", "bug": "", "cells": {}, "names": {}})
            row["title"] = row["title"] or c.title
            row["bug"] = row["bug"] or c.bug
            row["names"].setdefault((c.stack, c.underlay), c)
            mark = _short(label) if len(sections) > 1 else ""  # one run: the outcome says it all
            row["cells"].setdefault((c.stack, c.underlay), []).append(_cell(c, mark, section_dir, here))
    out = ['<table class="matrix"><thead><tr><th class="case" rowspan=2>case</th>'
           '<th class="title" rowspan=2>what it checks, and the bug it guards</th>']
    for stack in stacks_:
        span = sum(1 for s, _ in columns if s == stack)
        out.append(f'<th class="stack" colspan={span}>{html.escape(stack)}</th>')
    out.append("</tr><tr>" + "".join(f'<th class="fs">{html.escape(fs)}</th>' for _, fs in columns)
               + "</tr></thead><tbody>")
    for case_id in sorted(rows):
        row = rows[case_id]
        out.append(f'<tr><td class="case">{html.escape(case_id)}</td><td class="title">{html.escape(row["title"])}'
                   f'<br><i>{html.escape(row["bug"])}</i></td>')
        for column in columns:
            case = row["names"].get(column)  # the cell's address: report.html#<case>[<stack>-<underlay>]
            cell_id = f' id="{html.escape(case.name)}"' if case else ""
            out.append(f"<td{cell_id}>" + "".join(row["cells"].get(column, [])) + "</td>")
        out.append("</tr>")
    out.append("</tbody></table>")
    return out


def render(here, sections, heading):
    columns = sorted({(c.stack, c.underlay) for _, _, cases in sections for c in cases})
    legend = " ".join(_chip(o.name, o.label) for o in OUTCOMES) + ' <span class="o pass flaky">flaky</span>'
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(heading)}</title><style>{_style()}</style></head><body>",
        f"<h1>{html.escape(heading)}</h1>", *_runs(sections),
        "<h2>By stack and underlay</h2>", *_summary(sections, columns),
        f"<h2>Every case</h2><p>{legend}</p>", *_matrix(here, sections, columns),
        "</body></html>"])


def write(section_dir, results_dir, extra_xml=()):
    """Write section_dir/report.html over every section of results_dir (and the extra runs)."""
    sections = _sections(results_dir, extra_xml)
    current = os.path.realpath(section_dir)
    sections.sort(key=lambda s: os.path.realpath(s[1] or "") != current)  # this run first
    path = os.path.join(section_dir, "report.html")
    with open(path, "w") as f:
        f.write(render(section_dir, sections, f"stackcheck: {os.path.basename(section_dir)}"))
    return path
