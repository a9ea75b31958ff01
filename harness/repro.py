"""Reproductions: a failing case on someone else's FUSE stack, as one short Python
script to paste into that project's bug tracker.

A case that can be reproduced declares `repro=`: the body of `steps()`, plain
os calls that do what the case did, using the names below.  render() puts it
under a fixed preamble that mounts the stack with the exact command stackcheck
ran (its scratch paths made anew), runs the steps, prints each observation
beside what a correct stack returns, and unmounts.  The script needs python3
and the stack's program only.

Names a steps() body can use:
    MNT, HOST        the mount point; where the host edits (the source, or the lower layer)
    show(what, got, want)   print one observation, marked DIFF when it is not `want`
    attempt(fn)      fn()'s result, or the errno's name ("ENOENT") if it failed
    md5(path)        the md5 of a file's content
    in_container(gen, *args, beside=None)   run the generator gen(*args) as the stack's
                     user (the container's root, host uid 100000, on a shifting stack;
                     host root otherwise) in a process of its own (beside=another one:
                     in the same container); returns a handle whose next() resumes it up
                     to its next yield and returns what it yielded (plain values)
"""

import textwrap
from dataclasses import dataclass


@dataclass(frozen=True)
class Repro:
    """A case's reproduction: what a correct stack does, and steps() as source text."""
    rule: str
    steps: str

PREAMBLE = '''#!/usr/bin/env python3
"""{case_id} on {stack}: {title}

Guards:    {bug}
Versions:  {versions}
Correct:   {rule}
This one:  {reason}

Run as root: python3 {script_name}
It mounts {stack} on a new scratch directory with the command stackcheck ran
(stackcheck's scratch was {underlay}; this uses a directory under $TMPDIR),
runs the steps, prints what each one saw beside what a correct stack returns,
and unmounts.  Made by stackcheck (./check --stack {stack} {case_id}).
"""
import ast, ctypes, errno, hashlib, os, select, shutil, socket, stat, subprocess, sys, tempfile, traceback

SCRATCH = tempfile.mkdtemp(prefix="repro-")
os.chmod(SCRATCH, 0o755)  # the container's root must reach the mount
DIRS = {dirs!r}
for d in DIRS:
    os.makedirs(os.path.join(SCRATCH, d))
MNT, HOST = os.path.join(SCRATCH, "mnt"), os.path.join(SCRATCH, {host_dir!r})
COMMAND = [word.format(**{{d: os.path.join(SCRATCH, d) for d in DIRS}}, mountpoint=MNT)
           for word in {command!r}]
SHIFT = {shift!r}  # the container's root (host uid 100000, ids 0..65535 = 100000..165535) works through it
libc = ctypes.CDLL(None, use_errno=True)
differences = []


def show(what, got, want):
    same = got == want
    print(("ok    " if same else "DIFF  ") + f"{{what}}: {{got!r}}" + ("" if same else f"  (a correct stack: {{want!r}})"))
    if not same:
        differences.append(what)


def attempt(fn):
    try:
        return fn()
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))


def md5(path):
    with open(path, "rb") as f:
        return hashlib.md5(f.read()).hexdigest()


class in_container:
    def __init__(self, gen, *args, beside=None):  # beside: another in_container, whose namespace to join
        self.up_r, up_w = os.pipe()
        go_r, self.go_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            status = 1
            try:
                os.close(self.up_r)
                os.close(self.go_w)
                if SHIFT and beside is not None:
                    if libc.setns(os.open(f"/proc/{{beside.pid}}/ns/user", os.O_RDONLY), 0x10000000) != 0:
                        raise OSError(ctypes.get_errno(), "setns(CLONE_NEWUSER)")
                elif SHIFT and libc.unshare(0x10000000) != 0:  # CLONE_NEWUSER
                    raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWUSER)")
                os.write(up_w, b"u")  # unshared: now the parent writes the id maps
                os.read(go_r, 1)
                if SHIFT:
                    os.setresgid(0, 0, 0)
                    os.setresuid(0, 0, 0)
                with os.fdopen(up_w, "w") as up:
                    for value in gen(*args):
                        up.write(repr(value) + "\\n")
                        up.flush()
                        if not os.read(go_r, 1):
                            break
                status = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(status)  # never the parent's code
        os.close(up_w)
        os.close(go_r)
        os.read(self.up_r, 1)
        if SHIFT and beside is None:
            for name in ("uid_map", "gid_map"):
                with open(f"/proc/{{self.pid}}/{{name}}", "w") as f:
                    f.write("0 100000 65536\\n")
        self.up = os.fdopen(self.up_r)

    def next(self):
        os.write(self.go_w, b"x")
        line = self.up.readline()
        if not line:
            raise RuntimeError("the container process ended early (see above)")
        return ast.literal_eval(line)

    def close(self):
        os.close(self.go_w)
        os.waitpid(self.pid, 0)


def mount():
    print("$ " + " ".join(COMMAND))
    daemon = subprocess.Popen(COMMAND)
    with open("/proc/self/mounts") as table:  # wait for the mount, or for the daemon's end
        poller = select.poll()
        poller.register(table, select.POLLPRI)
        while MNT not in [line.split()[1] for line in table.readlines()]:
            if daemon.poll() is not None:
                sys.exit(f"the stack did not mount (exit status {{daemon.returncode}})")
            poller.poll(1000)
            table.seek(0)
    return daemon


def steps():
{steps}


daemon = mount()
try:
    steps()
finally:
    if subprocess.run(["umount", MNT]).returncode:
        subprocess.run(["umount", "-l", MNT])
    try:
        daemon.wait(timeout=10)
    except subprocess.TimeoutExpired:
        daemon.kill()
    subprocess.run(["rm", "-rf", "--one-file-system", SCRATCH])
print(f"{{len(differences)}} difference(s) from a correct stack" + (": " + "; ".join(differences) if differences else ""))
sys.exit(1 if differences else 0)
'''


def render(case_id, title, bug, stack, underlay, versions, rule, reason, steps, dirs, host_dir, command, shift):
    """The reproduction script's text; command holds {source}/{lower}/... and {mountpoint}."""
    return PREAMBLE.format(
        case_id=case_id, stack=stack, underlay=underlay, title=title, bug=bug or "-", versions=versions,
        rule=rule, reason=reason.splitlines()[0] if reason else "", script_name=f"{case_id.replace('/', '-')}.py",
        dirs=tuple(dirs), host_dir=host_dir, command=list(command), shift=shift,
        steps=textwrap.indent(textwrap.dedent(steps).strip("\n"), "    "))
