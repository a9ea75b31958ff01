"""Expunge lists, as xfstests users keep them: cases not to run, each with its reason.

One entry a line; blank lines and lines starting with # are ignored:

    CASE-ID|GLOB [stack=GLOB] [underlay=GLOB] [kernel>=X.Y] [kernel<X.Y] ... : reason (link)

Conditions are and-ed; kernel bounds compare the release's major.minor.patch.
An expunged case is reported "not run: expunged: <reason> (<file>:<line>)" in
every report: it is never hidden.
"""

import fnmatch
import os
import re
from dataclasses import dataclass

from harness.probe import kernel_version

_KERNEL = re.compile(r"^kernel(>=|<=|==|>|<)(\d+(?:\.\d+){0,2})$")
_OPS = {">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b, "==": lambda a, b: a == b,
        ">": lambda a, b: a > b, "<": lambda a, b: a < b}
SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "expunges")


class ExpungeError(ValueError):
    pass


@dataclass(frozen=True)
class Entry:
    case: str
    stack: str
    underlay: str
    kernel: tuple  # ((op, version), ...)
    reason: str
    where: str

    def matches(self, case_id, variant, fstype, release):
        from harness import stacks  # late: expunge lists are read before any stack is needed
        return (fnmatch.fnmatchcase(case_id, self.case) and stacks.matches(self.stack, variant)
                and fnmatch.fnmatchcase(fstype, self.underlay)
                and all(_OPS[op](kernel_version(release), version) for op, version in self.kernel))


def parse(path):
    entries = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            where = f"{os.path.basename(path)}:{number}"
            if " : " not in line:
                raise ExpungeError(f"{where}: an entry needs ' : reason' after the case")
            head, reason = (part.strip() for part in line.split(" : ", 1))
            words = head.split()
            fields = {"stack": "*", "underlay": "*"}
            kernel = []
            for word in words[1:]:
                match = _KERNEL.match(word)
                if match:
                    kernel.append((match.group(1), kernel_version(match.group(2))))
                elif "=" in word and word.split("=", 1)[0] in fields:
                    key, value = word.split("=", 1)
                    fields[key] = value
                else:
                    raise ExpungeError(f"{where}: cannot read {word!r} (stack=, underlay=, kernel>=X.Y)")
            entries.append(Entry(words[0], fields["stack"], fields["underlay"], tuple(kernel), reason, where))
    return entries


def load(paths):
    """Entries of the shipped lists (expunges/*.txt) and of the files given."""
    shipped = sorted(os.path.join(SHIPPED, n) for n in os.listdir(SHIPPED) if n.endswith(".txt")) \
        if os.path.isdir(SHIPPED) else []
    return [entry for path in shipped + list(paths) for entry in parse(path)]


def reason_for(entries, case_id, variant, fstype, release):
    for entry in entries:
        if entry.matches(case_id, variant, fstype, release):
            return f"expunged: {entry.reason} ({entry.where})"
    return None
