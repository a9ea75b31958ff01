"""Other people's FUSE stacks: bindfs and fuse-overlayfs, and any stack given as a
command template, with the bundled stack's guarantees."""

import os
import re
import shutil

import pytest

from conftest import NO_TRACES, harness_traces
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


@needs_bindfs
def test_a_template_runs_as_the_built_in_stack_does(check):
    """bindfs given as a template: every case has the same outcome and message as
    the registered bindfs stack, the version is recorded, nothing is left."""
    done = check("--stack-command", f"tpl-bindfs=shift:{BINDFS_TEMPLATE}", "--stack", "tpl-bindfs",
                 "--stack", "bindfs", "--underlay", "tmpfs", "-g", "quick", "-j", "2", timeout=900)
    assert done.returncode in (0, 1), done.stdout + done.stderr
    ours, theirs = outcomes(done.stdout, "tpl-bindfs"), outcomes(done.stdout, "bindfs")
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
