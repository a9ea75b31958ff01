"""Other people's FUSE stacks: bindfs and fuse-overlayfs, and any stack given as a
command template, with the bundled stack's guarantees."""

import os
import re
import shutil

import pytest

from conftest import CHECK_LIMIT, NO_TRACES, harness_traces, waits_for
from harness.stacks import command

BINDFS_TEMPLATE = ("bindfs -f -o dev,fsname={fsname} --uid-offset={uid_offset} --gid-offset={gid_offset} "
                   "{source} {mountpoint}")
OUTCOME = re.compile(r"^(stack/\d+)\[([\w-]+)-tmpfs\] (?:- |\[not run\] |\[expected failure\] )?(.*?)(?: \(see .*)?  \[",
                     re.M)
needs_bindfs = pytest.mark.skipif(not shutil.which("bindfs"), reason="bindfs is not installed")


@pytest.mark.parametrize("kind, template, problem", [
    ("stacked", "x {mountpoint}", "stack kind must be shift or union, not 'stacked'"),
    ("shift", "x {source}", "the command never names {mountpoint}"),
    ("union", "x -o lowerdir={source} {mountpoint}", "unknown placeholder {source} for a union stack"),
    ("shift", "x {mountpoint", "bad placeholder in '{mountpoint'"),
    ("shift", "", "the command is empty"),
])
def test_a_template_that_cannot_work_is_named(kind, template, problem):
    with pytest.raises(command.TemplateError, match=re.escape(problem)):
        command.check_template(kind, template)


def test_placeholders_are_filled_word_by_word(tmp_path):
    """A path with a space stays one argument; the offset is the container map's."""
    cls = command.define("test-words", "shift", "prog -f --uid-offset={uid_offset} {source} {mountpoint}")

    class FakeUnderlay:
        def path(self, *parts):
            return os.path.join(str(tmp_path / "with space"), *parts)
    stack = cls("test-words", FakeUnderlay(), str(tmp_path / "work dir"))
    assert stack.daemon_argv() == ["prog", "-f", "--uid-offset=100000", str(tmp_path / "with space" / "source"),
                                   str(tmp_path / "work dir" / "mnt")]


def test_config_file_defines_stacks(tmp_path):
    config = tmp_path / "stacks.toml"
    config.write_text('[stack.cfg-union]\nkind = "union"\n'
                      'command = "fuse-overlayfs -f -o lowerdir={lower},upperdir={upper},workdir={work} {mountpoint}"\n'
                      'version = "fuse-overlayfs --version"\n')
    command.define_all(configs=[str(config)])
    from harness import stacks
    cls = stacks.stack_class("cfg-union")
    assert "union" in cls.traits and cls.kind == "fuse" and cls.commands("cfg-union") == ("fuse-overlayfs",)
    assert stacks.matches("fuse", "cfg-union")


@pytest.mark.parametrize("args, message", [
    (("--stack-command", "broken"), "check: --stack-command takes NAME=KIND:TEMPLATE, not 'broken'"),
    (("--stack-command", "x=shift:prog {src} {mountpoint}", "--stack", "x"),
     "check: unknown placeholder {src} for a shift stack"),
    (("--stack-command", "x=shift:no-such-fuse-program -f {source} {mountpoint}", "--stack", "x"),
     "check: stack x is not available: no-such-fuse-program not found on PATH"),
    (("--stack-config", "/nonexistent/stacks.toml"), "check: stack config /nonexistent/stacks.toml: No such file"),
])
def test_bad_stack_definitions_exit_2_with_one_line(check, args, message):
    done = check(*args, "--underlay", "tmpfs", "stack/001")
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.startswith(message) and done.stderr.count("\n") == 1, done.stderr
    assert harness_traces(check.run_base) == NO_TRACES


def outcomes(stdout, stack):
    """case -> its progress line's verdict ("pass" for a duration), for one stack."""
    return {case: "pass" if re.fullmatch(r"[\d.]+s", text) else text
            for case, variant, text in OUTCOME.findall(stdout) if variant == stack}


@waits_for(900)
@needs_bindfs
def test_a_template_runs_as_the_built_in_stack_does(check):
    """bindfs given as a template: every case has the same outcome and message as
    the registered bindfs stack (but for its expunge), the version is recorded,
    nothing is left."""
    done = check("--stack-command", f"tpl-bindfs=shift:{BINDFS_TEMPLATE}", "--stack", "tpl-bindfs",
                 "--stack", "bindfs", "--underlay", "tmpfs", "-g", "quick", "-j", "2", timeout=900)
    assert done.returncode in (0, 1), done.stdout + done.stderr
    ours, theirs = outcomes(done.stdout, "tpl-bindfs"), outcomes(done.stdout, "bindfs")
    # The shipped expunge of bindfs' documented ACL choice names the bindfs stack, not a template.
    assert theirs.pop("stack/020").startswith("expunged: bindfs documents --uid-offset")
    assert ours.pop("stack/020") == "S4 the ACL names uid 1000 on disk: got [101000]"
    assert len(ours) >= 15 and ours == theirs, (ours, theirs)
    assert "fail" not in ours.values() and any(v != "pass" for v in ours.values())
    full = open(os.path.join(check.section_dir(), "stack", "001.tpl-bindfs-tmpfs.full")).read()
    assert re.search(r"^stack: +tpl-bindfs; version: bindfs \d", full, re.M), full[:600]
    assert harness_traces(check.run_base) == NO_TRACES


@needs_bindfs
def test_a_daemon_that_leaves_the_foreground_is_named_and_cleaned_up(check):
    done = check("--stack-command", "bg=shift:bindfs --uid-offset={uid_offset} {source} {mountpoint}",
                 "--stack", "bg", "--underlay", "tmpfs", "stack/001")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "bg exited with status 0 and left its mount served by a background process" in done.stdout
    assert harness_traces(check.run_base) == NO_TRACES


def declared_cases():
    """Every case's declaration (fixtures.Case), from the case modules."""
    import importlib.util
    from conftest import ROOT
    found = []
    for name in sorted(os.listdir(os.path.join(ROOT, "cases"))):
        if name.startswith("test_") and name.endswith(".py"):
            spec = importlib.util.spec_from_file_location(f"repro_check_{name[:-3]}", os.path.join(ROOT, "cases", name))
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            for fn in vars(module).values():
                found += [m.args[0] for m in getattr(fn, "pytestmark", []) if m.name == "stackcheck_case"]
    return found


@pytest.mark.parametrize("shift", [True, False])
def test_every_reproduction_is_valid_python(shift):
    from harness.repro import render
    with_repro = [info for info in declared_cases() if info.repro]
    assert {"stack/001", "stack/005", "stack/010", "stack/014", "stack/022"} <= {i.case_id for i in with_repro}
    for info in with_repro:
        text = render(info.case_id, info.title, "", "x", "tmpfs", "kernel", info.repro.rule, "reason",
                      info.repro.steps, ("source", "mnt"), "source", ["prog", "{source}", "{mountpoint}"], shift)
        compile(text, f"{info.case_id}.repro.py", "exec")


def stackfs_template(name, *bugs):
    import sys
    return (f"{name}=shift:{sys.executable} -m harness.stackfs shift {{source}} {{mountpoint}} --map {{map}}"
            + "".join(f" --bug {b}" for b in bugs))


REPRODUCTION_LIMIT = 120


def run_reproduction(path, command_fix=None):
    import subprocess
    import sys
    from conftest import ROOT
    text = open(path).read()
    if command_fix:
        text = command_fix(text)
    return subprocess.run([sys.executable, "-"], input=text, capture_output=True, text=True, timeout=REPRODUCTION_LIMIT,
                          env=dict(os.environ, PYTHONPATH=ROOT))


@waits_for(CHECK_LIMIT, REPRODUCTION_LIMIT, REPRODUCTION_LIMIT)
@pytest.mark.parametrize("case_id, bug, diff", [
    ("stack/005", "unlinked-special", "DIFF  fstat(fd) of the unlinked null: (type, nlink): 'ENOENT'"),
    ("stack/010", "stale-dentry", "DIFF  read: md5 of F:"),
    ("stack/001", "estale-reopen", "DIFF  open /proc/self/fd/N O_RDONLY: 'ESTALE'"),
])
def test_a_reproduction_shows_the_bug_and_passes_without_it(check, case_id, bug, diff):
    """stackfs run from a template with a bug switch: the failing case's reproduction,
    run by hand, shows the bug; the same script with the switch taken out of its
    command finds no difference."""
    done = check("--stack-command", stackfs_template("buggy", bug), "--stack", "buggy", "--underlay", "tmpfs",
                 case_id)
    assert done.returncode == 1, done.stdout + done.stderr
    stem = os.path.join(check.section_dir(), case_id.split("/")[0], case_id.split("/")[1] + ".buggy-tmpfs")
    assert "reproduction outside stackcheck" in open(stem + ".out.bad").read()
    shown = run_reproduction(stem + ".repro.py")
    assert shown.returncode == 1 and diff in shown.stdout, shown.stdout + shown.stderr
    fixed = run_reproduction(stem + ".repro.py", lambda text: text.replace(f"'--bug', '{bug}'", ""))
    assert fixed.returncode == 0 and "0 difference(s)" in fixed.stdout, fixed.stdout + fixed.stderr
    assert harness_traces(check.run_base) == NO_TRACES
