"""./check: xfstests' command line, run through pytest.

    ./check [-g GROUP]... [-x GROUP]... [CASE-ID|GLOB]... [--stack S]... [--underlay FS]...
            [-n] [-j N] [--probe] [--results DIR] [--section NAME] [-- PYTEST-ARGS...]
    ./check --self-test [PYTEST-ARGS...]     (all arguments after it go to pytest)

Exit status: 0 all passed, not run or known gaps, 1 failures (known gaps too
with --strict), 2 usage or environment error.
Bad input gets one line on stderr and status 2, before anything is mounted.
"""

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from harness import expunge, kmod, modules, report, rundir, scratch, stacks, vm
from harness.baseline import compare_files
from harness.stacks import command as command_stacks
from harness.probe import MODULES_MANIFEST_ENV, run_probe
from harness.results import find_xml, unusable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USAGE_ERROR = 2


class UsageError(Exception):
    """Bad input or an unusable environment: one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def parse(argv):
    if "--self-test" in argv:  # everything after it is pytest's
        cut = argv.index("--self-test") + 1
        argv, self_test_args = argv[:cut], argv[cut:]
    else:
        self_test_args = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    else:
        extra = []
    p = _Parser(prog="check", description="stackcheck: regression tests for stacked filesystems.",
                epilog="Examples: ./check -g quick;  ./check --stack idmapped --underlay ext4 stack/001;  "
                       "./check -n -g shift;  ./check --probe")
    p.add_argument("cases", nargs="*", metavar="CASE-ID|GLOB", help="case ids or globs (stack/001, 'stack/01*')")
    p.add_argument("-g", dest="groups", action="append", default=[], metavar="GROUP", help="run cases in GROUP")
    p.add_argument("-x", dest="exclude", action="append", default=[], metavar="GROUP", help="leave out GROUP")
    p.add_argument("--stack", action="append", default=[], metavar="S",
                   help=f"stack variant or glob ({', '.join(stacks.variants())}; 'overlay*')")
    p.add_argument("--stack-option", action="append", default=[], metavar="KEY=VALUE",
                   help="option for stack kinds that take them (fuse-shift: bug=stale-dentry)")
    p.add_argument("--stack-command", action="append", default=[], metavar="NAME=KIND:TEMPLATE",
                   help="define a FUSE stack by its command line: KIND shift or union, placeholders {source} "
                        "{mountpoint} {uid_offset} {gid_offset} {map} or {lower} {upper} {work} {mountpoint}")
    p.add_argument("--stack-config", action="append", default=[], metavar="FILE",
                   help="TOML file of [stack.NAME] tables (kind, command, version) defining FUSE stacks")
    p.add_argument("--underlay", action="append", default=[], metavar="FS",
                   help=f"underlay filesystem ({', '.join(scratch.UNDERLAYS)})")
    p.add_argument("-n", dest="dry_run", action="store_true", help="list what would run, and why the rest would not")
    p.add_argument("-j", dest="jobs", type=int, default=1, metavar="N", help="run N cases at once (pytest-xdist)")
    p.add_argument("--probe", action="store_true", help="print what this machine and kernel can do, then exit")
    p.add_argument("--results", default=os.path.join(ROOT, "results"), metavar="DIR", help="results directory")
    p.add_argument("--section", help="results section name (default: the kernel release)")
    p.add_argument("--timeout", type=int, default=300, metavar="SECONDS", help="per-case time limit")
    p.add_argument("--case-dir", default=os.path.join(ROOT, "cases"), metavar="DIR",
                   help="where the cases are (default: cases/; e.g. a private suite)")
    p.add_argument("--expunge", action="append", default=[], metavar="FILE",
                   help="expunge list: cases reported not run, with the list's reason")
    p.add_argument("--shard", metavar="I/N", help="run the I-th of N even parts of the selection")
    p.add_argument("-C", "--fail-loop", type=int, default=0, metavar="N",
                   help="run a failed case again up to N times; passing on a rerun is flaky")
    p.add_argument("--strict", action="store_true",
                   help="count known gaps (rules no kernel release keeps yet, harness/errseq.py) as failures")
    p.add_argument("--baseline", metavar="RESULTS|XML",
                   help="compare with an earlier run: exit 1 only for regressions")
    p.add_argument("--kernel", action="append", default=[], metavar="SPEC",
                   help="run on another kernel in QEMU: a vmlinuz (with --modules), a .deb, or a Debian package "
                        "name; or several .deb files (repeat --kernel) or a directory of them, as Ubuntu splits a kernel")
    p.add_argument("--modules", metavar="DIR", help="with --kernel VMLINUZ: its lib/modules/<release>")
    p.add_argument("--module", action="append", default=[], dest="module_sources", metavar="SRC",
                   help="a kernel module under test, built from source and loaded for the run (repeatable): a DKMS "
                        "or Kbuild tree, or linux-source:PATH[+PATCH...] (the target kernel's own source, patched)")
    p.add_argument("--guest-timeout", type=int, default=3600, metavar="SECONDS",
                   help="with --kernel: the whole guest run's time limit")
    p.add_argument("--kernel-append", default="", help=argparse.SUPPRESS)  # tests: a panicking command line
    # tests: a module tree built here for --kernel and given to the guest's own run as
    # --module, which loads it as on a host with module loading (not at boot)
    p.add_argument("--guest-module", action="append", default=[], metavar="DIR", help=argparse.SUPPRESS)
    p.add_argument("--self-test", action="store_true", help="run stackcheck's own tests (tests/)")
    args = p.parse_args(argv)
    args.extra = self_test_args if args.self_test else extra
    args.guest_argv = _without(argv, ("--kernel", "--modules", "--module", "--guest-timeout", "--kernel-append",
                                      "--guest-module", "--results", "--baseline", "--expunge"))
    if extra:
        args.guest_argv += ["--", *extra]
    if args.jobs < 1:
        raise UsageError("-j takes a number of at least 1")
    return args


def _without(argv, options):
    """argv less the given options and their values (both "--opt V" and "--opt=V")."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in options:
            skip = True
        elif not any(arg.startswith(o + "=") for o in options):
            out.append(arg)
    return out


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _interrupt_on_signals():
    """SIGINT and SIGTERM end the run through its teardown.  Set for SIGINT too:
    a process started in the background by a shell without job control inherits
    SIGINT ignored, and would then never tear down on it."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _raise_interrupt)


def _check_explicit_requests(args, probe):
    """A stack or underlay asked for by name that this machine lacks is an error."""
    underlays = args.underlay or list(scratch.UNDERLAYS)
    for fs in args.underlay:
        missing = scratch.unavailable(fs, probe)
        if missing:
            raise UsageError(f"underlay {fs} is not available: {missing}")
    for variant in stacks.select(args.stack):
        reasons = [stacks.unavailable(variant, fs, probe) for fs in underlays]
        if all(reasons):
            raise UsageError(f"stack {variant} is not available: {reasons[0]}")


def _pytest_args(args, run, with_selection=True):
    pargs = [args.case_dir, "--rootdir", ROOT, "-c", os.path.join(ROOT, "pytest.ini"), "-p", "fixtures.plugin",
             "--run-dir", run.path, "--results", args.results, "--timeout", str(args.timeout)]
    selection = (("--group", args.groups), ("--exclude-group", args.exclude), ("--case", args.cases),
                 ("--shard", [args.shard] if args.shard else []))
    stack_choice = (("--stack-command", args.stack_command), ("--stack-config", args.stack_config),
                    ("--stack", args.stack), ("--stack-option", args.stack_option), ("--underlay", args.underlay),
                    ("--expunge", args.expunge))
    for flag, values in (selection if with_selection else ()) + stack_choice:
        for value in values:
            pargs += [flag, value]
    if args.section:
        pargs += ["--section", args.section]
    if args.strict:
        pargs += ["--strict-known-gaps"]
    return pargs


class _Collector:
    """Collect-only pass over every case: validates the selection, answers -n."""

    def __init__(self):
        self.items = []  # (Case, variant, fs)
        self.errors = []  # "<file>: <the error's last line>", for the one line a failed collection gets

    def pytest_collectreport(self, report):
        if report.failed:
            lines = str(report.longrepr).strip().splitlines() or ["no details"]
            self.errors.append(f"{report.nodeid or 'the case directory'}: {lines[-1]}")

    @pytest.hookimpl(tryfirst=True)
    def pytest_collection_modifyitems(self, items):
        from fixtures.plugin import case_of
        for item in items:
            info = case_of(item)
            spec = item.callspec.params.get("stack_spec") if info and hasattr(item, "callspec") else None
            if spec:
                self.items.append((info, *spec))


def _select(args, run_dir, probe, expunges):
    """The selected (case, variant, fs, not-run reason) list, in run order; bad
    selections raise."""
    from fixtures.plugin import parse_shard, selected, selection_problem, why_not_run
    collector = _Collector()
    code = pytest.main(_pytest_args(args, run_dir, with_selection=False) + ["--collect-only", "-p", "no:terminal"], plugins=[collector])
    if code not in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        raise UsageError(f"collecting the cases failed (pytest exit status {int(code)})"
                         + "".join(f": {error}" for error in collector.errors[:1]))
    problem = selection_problem([info for info, _, _ in collector.items], args.groups, args.exclude, args.cases)
    if problem:
        raise UsageError(problem)
    chosen = sorted((item for item in collector.items if selected(item[0], args.groups, args.exclude, args.cases)),
                    key=lambda item: item[0].case_id)
    shard = parse_shard(args.shard)
    if shard:
        chosen = [item for i, item in enumerate(chosen) if i % shard[1] == shard[0] - 1]
    return [(info, variant, fs, why_not_run(info, variant, fs, probe, expunges)) for info, variant, fs in chosen]


def self_test(args):
    os.chdir(ROOT)
    # Tests named (tests/test_x.py, tests/test_x.py::test_y) run alone; none named, all of tests/.
    named = any(os.path.exists(a.split("::")[0]) for a in args.extra if not a.startswith("-"))
    os.execv(sys.executable, [sys.executable, "-m", "pytest", "-c", os.path.join(ROOT, "pytest.ini"),
                              "--rootdir", ROOT, *([] if named else [os.path.join(ROOT, "tests")]), *args.extra])


def run(args):
    if os.geteuid() != 0:
        raise UsageError("must be run as root (it mounts filesystems and attaches loop devices)")
    if args.self_test:
        self_test(args)
    try:
        command_stacks.define_all(args.stack_command, args.stack_config)
    except command_stacks.TemplateError as e:
        raise UsageError(str(e)) from None
    try:
        stacks.select(args.stack)
    except KeyError as e:
        raise UsageError(f"unknown stack: {e.args[0]} (known: {', '.join(stacks.variants())})") from None
    for fs in args.underlay:
        if fs not in scratch.UNDERLAYS:
            raise UsageError(f"unknown underlay: {fs} (known: {', '.join(scratch.UNDERLAYS)})")
    if not os.path.isdir(args.case_dir):
        raise UsageError(f"no case directory {args.case_dir}")
    problem = unusable(args.results)
    if problem:
        raise UsageError(problem)
    try:
        from fixtures.plugin import parse_shard
        parse_shard(args.shard)
        expunges = expunge.load(args.expunge)
        baseline_xml = find_xml(args.baseline) if args.baseline else None
    except (pytest.UsageError, OSError, ValueError) as e:
        raise UsageError(str(e)) from None
    if args.fail_loop < 0:
        raise UsageError("-C takes a number of at least 0")
    try:
        sources = [modules.parse(spec) for spec in args.module_sources]
        guest_sources = [modules.parse(tree) for tree in args.guest_module]
    except modules.ModuleError as e:
        raise UsageError(str(e)) from None
    if any(s.kind == "linux-source" or s.patches for s in guest_sources) or guest_sources and not args.kernel:
        raise UsageError("--guest-module takes a module tree (no patches), with --kernel")
    if args.kernel:
        return _run_in_guest(args, sources, guest_sources)
    if sources and kmod.unavailable():
        raise UsageError(f"--module needs module loading, and {kmod.unavailable()}: "
                         f"run it in a guest with --kernel SPEC")
    _recover_leftovers()
    _interrupt_on_signals()
    try:
        run_dir = rundir.RunDir.create(os.environ.get("STACKCHECK_RUN_BASE"))
    except (OSError, RuntimeError) as e:
        raise UsageError(str(e)) from None
    try:
        with contextlib.ExitStack() as loaded:
            if sources:
                try:
                    loaded.enter_context(kmod.HostModules(_build_for_host(sources, args, run_dir)))
                except (modules.ModuleError, kmod.KmodError) as e:
                    raise UsageError(str(e)) from None
            return _run_on_host(args, run_dir, expunges, baseline_xml)
    finally:
        for what in run_dir.remove():
            print(f"stackcheck: teardown left {what} behind; removed it", file=sys.stderr)


def _recover_leftovers():
    """What runs killed before their teardown left behind goes first."""
    for line in rundir.recover_leftovers(os.environ.get("STACKCHECK_RUN_BASE")):
        print(f"stackcheck: {line}", file=sys.stderr)


def _build_for_host(sources, args, run_dir):
    """The modules built for the running kernel; the probe (in every worker)
    finds them through their manifest."""
    release = os.uname().release
    log_path = os.path.join(os.path.abspath(args.results), args.section or release, "build.log")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    modules.ensure_loading_tools(log_path)
    built = [m for source in sources for m in modules.build(source, release, None, log_path)]
    manifest = os.path.join(run_dir.path, "modules.json")
    with open(manifest, "w") as f:
        json.dump([dataclasses.asdict(m) for m in built], f)
    os.environ[MODULES_MANIFEST_ENV] = manifest
    return built


def _run_on_host(args, run_dir, expunges, baseline_xml):
    """The run in this kernel: probe, select, pytest, the baseline comparison."""
    probe = run_probe(run_dir.sub("probe"))
    with open(os.path.join(run_dir.path, "probe.json"), "w") as f:
        f.write(probe.to_json())
    if args.probe:
        print(probe.table())
        return 0
    _check_explicit_requests(args, probe)
    selection = _select(args, run_dir, probe, expunges)
    if args.dry_run:
        for info, variant, fs, reason in selection:
            name = f"{info.case_id} [{variant}-{fs}]"
            print(f"{name:<36} {'not run: ' + reason if reason else 'would run'}")
        print(f"{sum(1 for s in selection if not s[3])} of {len(selection)} would run")
        return 0
    pargs = _pytest_args(args, run_dir) + ["--check-progress", "-qq", "--tb=no", "-rN"]
    if args.jobs > 1:
        pargs += ["-n", str(args.jobs)]
    if args.fail_loop:
        pargs += ["--reruns", str(args.fail_loop)]
    code = pytest.main(pargs + args.extra)
    if code == pytest.ExitCode.NO_TESTS_COLLECTED:
        print("no case selected")
        return 0
    if code not in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED):
        return USAGE_ERROR
    if baseline_xml:
        section = os.path.join(args.results, args.section or probe.kernel)
        lines, comparison = compare_files(baseline_xml, section)
        print("\n".join(lines))
        report.write(section, args.results, extra_xml=[baseline_xml])
        return 1 if comparison.failed else 0
    return 0 if code == pytest.ExitCode.OK else 1


def _run_in_guest(args, sources, guest_sources):
    """The same run inside a guest booted from another kernel (harness/vm.py), with
    the modules under test built for that kernel (and those for the guest's run to
    load, built into the cache that the guest reads)."""
    _interrupt_on_signals()
    results_dir = os.path.abspath(args.results)
    what = " ".join(args.kernel)
    try:
        kernel = vm.resolve_kernel(args.kernel, args.modules, complete=lambda release, version: modules.cached(
            sources + guest_sources, release, version))
        log_path = os.path.join(results_dir, kernel.release, "build.log")
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        built = [m for source in sources for m in modules.build(source, kernel.release, kernel.version or None, log_path)]
        if guest_sources:  # built here, so that the guest's build, in a read-only cache, is a hit
            modules.ensure_loading_tools(log_path)
            for source in guest_sources:
                modules.build(source, kernel.release, kernel.version or None, log_path)
    except (vm.GuestError, modules.ModuleError, OSError, subprocess.CalledProcessError) as e:
        raise UsageError(f"--kernel {what}: {e}") from None
    _recover_leftovers()
    run_dir = rundir.RunDir.create(os.environ.get("STACKCHECK_RUN_BASE"))
    # The guest sees the host's root, less its /tmp (a tmpfs there), and the results
    # directory at its own path: what the run reads is copied there.
    shared, guest_argv = [], list(args.guest_argv)
    inputs = [("--baseline", find_xml(args.baseline))] if args.baseline else []
    inputs += [("--expunge", path) for path in args.expunge]
    inputs += [("--module", source.path) for source in guest_sources]
    for i, (option, path) in enumerate(inputs):
        copy = os.path.join(results_dir, f".guest-input-{i}-{os.path.basename(path)}")
        (shutil.copytree if os.path.isdir(path) else shutil.copyfile)(path, copy)
        shared.append(copy)
        guest_argv += [option, copy]
    try:
        return vm.run(kernel, guest_argv, results_dir, run_dir.sub("vm"),
                      built=built, timeout=args.guest_timeout, append=args.kernel_append)
    except (vm.GuestError, OSError, subprocess.CalledProcessError) as e:
        raise UsageError(f"--kernel {what}: {e}") from None
    finally:
        for copy in shared:
            (shutil.rmtree if os.path.isdir(copy) else os.unlink)(copy)
        run_dir.remove()


def main(argv=None):
    try:
        args = parse(sys.argv[1:] if argv is None else argv)
        return run(args)
    except UsageError as e:
        print(f"check: {e}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print("check: interrupted", file=sys.stderr)
        return USAGE_ERROR
    except BrokenPipeError:  # `./check -n | head`: the reader has gone
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
