"""FUSE stacking filesystems run from a command template: other people's stacks.

A template is the daemon's command line with placeholders; stackcheck fills
them in, runs the command in the foreground (it must not fork away), waits for
its mount to appear, and stops it by unmounting, with the same abort and kill
guarantees as the bundled stackfs (harness/fusedaemon.py).

    shift: {source} {mountpoint} {uid_offset} {gid_offset} {map} {fsname}
    union: {lower} {upper} {work} {mountpoint} {fsname}

{map} is the container's id map as inside:outside:count.  A shifting stack
must show on-disk id N as host id N + {uid_offset} (the container's N) and
store what the container creates with the offset taken off again.

Users define stacks without Python: `--stack-command NAME=KIND:TEMPLATE`, or a
TOML file given with `--stack-config FILE`:

    [stack.my-bindfs]
    kind = "shift"
    command = "bindfs -f --uid-offset={uid_offset} --gid-offset={gid_offset} {source} {mountpoint}"
    version = "bindfs --version"        # optional: how to ask its version
"""

import os
import shlex
import shutil
import string
import subprocess
import tomllib

from harness.rundir import TAG
from harness.stacks import base, register

PLACEHOLDERS = {
    "shift": ("source", "mountpoint", "uid_offset", "gid_offset", "map", "fsname"),
    "union": ("lower", "upper", "work", "mountpoint", "fsname"),
}
KIND_BASES = {"shift": base.ShiftingStack, "union": base.LayeredStack}
_VERSIONS = {}  # stack class -> its program's version line


class TemplateError(ValueError):
    """A stack template that cannot be used, in one line."""


class CommandStack(base.DaemonStack):
    """A FUSE stack whose daemon is a command template (see the module's doc)."""

    kind = "fuse"
    template = ""          # the command line, with placeholders
    version_command = ""   # how to ask the program's version; default: <program> --version
    daemon_ready = "mount"  # third-party daemons know nothing of --ready-fd
    in_default_run = False  # someone else's stack: run when asked for, its findings are its own

    @classmethod
    def program(cls):
        return shlex.split(cls.template)[0]

    @classmethod
    def commands(cls, variant):
        return (cls.program(),)

    @classmethod
    def features(cls, variant):
        return ("fuse", "userns") if issubclass(cls, base.ShiftingStack) else ("fuse",)

    @classmethod
    def version(cls):
        if cls not in _VERSIONS:  # asked once per run and process, not per case
            _VERSIONS[cls] = cls._ask_version()
        return _VERSIONS[cls]

    @classmethod
    def _ask_version(cls):
        argv = shlex.split(cls.version_command) if cls.version_command else [cls.program(), "--version"]
        if not shutil.which(argv[0]):
            return f"{argv[0]}: not installed"
        done = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=30)
        lines = [line.strip() for line in (done.stdout + done.stderr).splitlines() if line.strip()]
        own = [line for line in lines if os.path.basename(argv[0]) in line]  # not its FUSE library's lines
        return (own or lines or [f"{' '.join(argv)} printed nothing (exit status {done.returncode})"])[0]

    def placeholders(self):
        values = {"mountpoint": self.mountpoint, "fsname": f"{TAG}-{self.variant}"}
        if isinstance(self, base.ShiftingStack):
            m = self.user_map
            values.update(source=self.source, uid_offset=m.outside - m.inside, gid_offset=m.outside - m.inside,
                          map=f"{m.inside}:{m.outside}:{m.count}")
        else:
            values.update(lower=self.lower, upper=self.upper, work=self.work)
        return values

    def reproduction_command(self):
        """The command's words with every placeholder filled but the directories
        ({source}, {lower}, ... {mountpoint}), which a reproduction makes anew."""
        keep = {name: "{" + name + "}" for name in ("source", "lower", "upper", "work", "mountpoint")}
        values = {**self.placeholders(), **keep}
        return [word.format(**values) for word in shlex.split(self.template)]

    def reproduction_dirs(self):
        """The directories a reproduction makes, and the one the host edits in."""
        if isinstance(self, base.ShiftingStack):
            return ("source", "mnt"), "source"
        return ("lower", "upper", "work", "mnt"), "lower"

    def daemon_argv(self):
        # Filled in word by word: a path with spaces stays one argument.
        values = self.placeholders()
        return [word.format(**values) for word in shlex.split(self.template)]


def check_template(kind, template):
    """The template's words, or TemplateError naming what is wrong with it."""
    if kind not in PLACEHOLDERS:
        raise TemplateError(f"stack kind must be shift or union, not {kind!r}")
    try:
        words = shlex.split(template)
    except ValueError as e:
        raise TemplateError(f"cannot split the command {template!r}: {e}") from None
    if not words:
        raise TemplateError("the command is empty")
    used = set()
    for word in words:
        try:
            used |= {field for _, field, _, _ in string.Formatter().parse(word) if field is not None}
        except ValueError as e:
            raise TemplateError(f"bad placeholder in {word!r}: {e}") from None
    unknown = sorted(used - set(PLACEHOLDERS[kind]))
    if unknown:
        raise TemplateError(f"unknown placeholder {{{unknown[0]}}} for a {kind} stack "
                            f"(known: {', '.join('{' + p + '}' for p in PLACEHOLDERS[kind])})")
    if "mountpoint" not in used:
        raise TemplateError("the command never names {mountpoint}")
    return words


def define(name, kind, template, version_command="", origin="command line"):
    """Register a stack variant `name` run from template; returns its class."""
    check_template(kind, template)
    from harness import stacks
    if name in stacks.variants():
        if getattr(stacks.stack_class(name), "template", None) == template:
            return stacks.stack_class(name)  # the same definition again (a worker re-reading the options)
        raise TemplateError(f"stack {name} ({origin}) is already defined")
    cls = type(f"CommandStack_{name}", (CommandStack, KIND_BASES[kind]),
               {"variants": {name: {}}, "template": template, "version_command": version_command,
                "origin": origin, "__doc__": f"{name}: {kind} stack from {origin}"})
    return register(cls)


def parse_option(text):
    """NAME=KIND:TEMPLATE -> (name, kind, template)."""
    name, sep, rest = text.partition("=")
    kind, sep2, template = rest.partition(":")
    if not (sep and sep2 and name.strip()):
        raise TemplateError(f"--stack-command takes NAME=KIND:TEMPLATE, not {text!r}")
    return name.strip(), kind.strip(), template.strip()


def load_config(path):
    """[(name, kind, template, version_command)] from a TOML file's [stack.NAME] tables."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise TemplateError(f"stack config {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise TemplateError(f"stack config {path}: {e}") from None
    found = []
    for name, table in (data.get("stack") or {}).items():
        if not isinstance(table, dict) or "kind" not in table or "command" not in table:
            raise TemplateError(f"stack config {path}: [stack.{name}] needs kind and command")
        found.append((name, table["kind"], table["command"], table.get("version", "")))
    if not found:
        raise TemplateError(f"stack config {path}: no [stack.NAME] table")
    return found


def define_all(options=(), configs=()):
    """Register the stacks of --stack-command options and --stack-config files."""
    for path in configs:
        for name, kind, template, version in load_config(path):
            define(name, kind, template, version, origin=path)
    for text in options:
        define(*parse_option(text))
