"""results/<section>/report.html: one self-contained page (no network) for a run.

The matrix of cases x stacks x underlays, one mark per kernel when the results
directory holds several sections (or a baseline is given), coloured by
outcome, with the bug each case guards and links to each case's .full,
.out.bad and .dmesg.
"""

import html
import os

from harness import results as res

STYLE = """
body { font: 13px/1.4 sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 18px; } table { border-collapse: collapse; }
th, td { border: 1px solid #ccc; padding: 2px 4px; vertical-align: top; }
th.stack { background: #eef; } th.fs { background: #f6f6ff; font-weight: normal; }
td.case { white-space: nowrap; } td.title { max-width: 28em; font-size: 12px; }
a.o { display: block; margin: 1px 0; padding: 0 3px; border-radius: 3px; color: #000;
      text-decoration: none; font-size: 11px; white-space: nowrap; }
.pass { background: #9be39b; } .fail { background: #f28b82; } .notrun { background: #ddd; }
.xfail { background: #fcd98a; } .flaky { outline: 2px dashed #b06000; }
.legend span { padding: 0 6px; margin-right: 6px; border-radius: 3px; }
pre { background: #f7f7f7; padding: 6px; white-space: pre-wrap; }
"""
LABEL = {res.PASS: "pass", res.FAIL: "FAIL", res.NOTRUN: "not run", res.XFAIL: "expected failure"}


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


def _cell(case, label, section_dir, here):
    classes = f"o {case.outcome}" + (" flaky" if case.properties.get("flaky") else "")
    title = LABEL[case.outcome] + (f": {case.reason}" if case.reason else "")
    target = os.path.relpath(os.path.join(section_dir, case.stem + ".full"), here)
    links = [f'<a class="{classes}" href="{html.escape(target)}" title="{html.escape(title)}">'
             f"{html.escape(label) + ': ' if label else ''}{LABEL[case.outcome]}</a>"]
    for suffix in (".out.bad", ".dmesg"):
        path = os.path.join(section_dir, case.stem + suffix)
        if os.path.exists(path):
            links.append(f'<a class="o" href="{html.escape(os.path.relpath(path, here))}">{suffix[1:]}</a>')
    return "".join(links)


def render(here, sections, heading):
    columns = sorted({(c.stack, c.underlay) for _, _, cases in sections for c in cases})
    stacks_ = sorted({s for s, _ in columns}, key=lambda s: [s2 for s2, _ in columns].index(s))
    rows = {}
    for label, section_dir, cases in sections:
        for c in cases:
            row = rows.setdefault(c.case_id, {"title": "", "bug": "", "cells": {}})
            row["title"] = row["title"] or c.title
            row["bug"] = row["bug"] or c.bug
            mark = label.split(" (")[0] if len(sections) > 1 else ""  # one run: the outcome says it all
            row["cells"].setdefault((c.stack, c.underlay), []).append(_cell(c, mark, section_dir, here))
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{html.escape(heading)}</title><style>{STYLE}</style></head><body>",
           f"<h1>{html.escape(heading)}</h1>",
           '<p class="legend">' + "".join(f'<span class="{o}">{LABEL[o]}</span>' for o in LABEL)
           + '<span class="pass flaky">flaky</span></p>']
    for label, _, cases in sections:
        lines = res.summary_lines(label, cases)
        out.append(f"<details><summary>{html.escape(label)}: {html.escape(lines[-1])}</summary>"
                   f"<pre>{html.escape(chr(10).join(lines[1:]))}</pre></details>")
    out.append("<table><thead><tr><th rowspan=2>case</th><th rowspan=2>what it checks, and the bug it guards</th>")
    for stack in stacks_:
        span = sum(1 for s, _ in columns if s == stack)
        out.append(f'<th class="stack" colspan={span}>{html.escape(stack)}</th>')
    out.append("</tr><tr>" + "".join(f'<th class="fs">{html.escape(fs)}</th>' for _, fs in columns) + "</tr></thead><tbody>")
    for case_id in sorted(rows):
        row = rows[case_id]
        out.append(f'<tr><td class="case">{html.escape(case_id)}</td><td class="title">{html.escape(row["title"])}'
                   f'<br><i>{html.escape(row["bug"])}</i></td>')
        for column in columns:
            out.append("<td>" + "".join(row["cells"].get(column, [])) + "</td>")
        out.append("</tr>")
    out.append("</tbody></table></body></html>")
    return "\n".join(out)


def write(section_dir, results_dir, extra_xml=()):
    """Write section_dir/report.html over every section of results_dir (and the extra runs)."""
    sections = _sections(results_dir, extra_xml)
    current = os.path.realpath(section_dir)
    sections.sort(key=lambda s: os.path.realpath(s[1] or "") != current)  # this run first
    path = os.path.join(section_dir, "report.html")
    with open(path, "w") as f:
        f.write(render(section_dir, sections, f"stackcheck: {os.path.basename(section_dir)}"))
    return path
