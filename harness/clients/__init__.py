"""Real programs that save files, driven as a person at a terminal would (pexpect).

Every module here registers one Client: the command and Debian package it
needs, its save styles, prepare() to lay out what the save starts from (a file,
or a working tree with a local change) and save() to run the real program.
Each run gets a clean, explicit configuration: HOME in a scratch directory, no
user or system init files, TERM and locale set, and a timeout on every wait; a
program that shows something unexpected fails with its screen or output.
"""

import hashlib
import importlib
import os
import pkgutil
import re
import shutil
import sys
from dataclasses import dataclass

import pexpect
import psutil

TIMEOUT = 60  # seconds for any one wait on a program; a slow CI machine is still far inside it
_CLIENTS = {}  # name -> Client subclass
_ESCAPES = re.compile(r"\x1b(\[[0-9;?<>=]*[ -/]*[@-~]|\][^\x07]*\x07|[()][A-Z0-9]|[=>78])")


class ClientFailed(RuntimeError):
    """The program did not do what a person would have seen it do."""


def register(cls):
    _CLIENTS[cls.name] = cls
    return cls


def clients():
    return dict(_CLIENTS)


def client(name):
    return _CLIENTS[name]()


def screen_text(raw):
    """What a terminal showed, without its control sequences or NUL padding (for failure messages)."""
    text = _ESCAPES.sub("", raw if isinstance(raw, str) else raw.decode(errors="replace")).replace("\x00", "")
    lines = [line.rstrip() for line in text.replace("\r", "\n").split("\n")]
    return "\n".join(line for line in lines if line.strip())[-2000:]


@dataclass(frozen=True)
class Write:
    """Put data in a file: a name in F's directory, or "{home}/..." in the session's HOME."""
    path: str
    data: bytes


@dataclass(frozen=True)
class Run:
    """Run a program in F's directory; "{home}" in a word is the session's HOME."""
    argv: tuple


@dataclass
class Session:
    """Where a client runs: its HOME (a scratch directory of its own)."""
    home: str

    def env(self, extra=None):
        # vt100: an xterm makes Emacs wait 2 s for answers to its terminal queries,
        # and the terminal type changes nothing in how a file is saved.
        return {"HOME": self.home, "TMPDIR": self.home, "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
                "TERM": "vt100", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "USER": "root", "LOGNAME": "root",
                **(extra or {})}


class Client:
    name = ""
    command = ""          # the executable that must be on PATH
    package = ""          # the Debian package that has it
    styles = {}           # style -> what the program does when it saves that way
    in_place = ()         # the styles that rewrite F's own inode (the others give F a new one)
    env = {}              # variables that keep the program off any user or system configuration

    @classmethod
    def unavailable(cls):
        if not shutil.which(cls.command):
            return f"{cls.command} not found on PATH (Debian package {cls.package})"
        return None

    def version(self, session):
        """The program's version line, for the results."""
        return _version(self, session)

    def prepare_steps(self, name, old, new):
        """What lays out the save's starting point in F's directory: F holding `old`."""
        return [Write(name, old)]

    def save_steps(self, name, new, style):
        """The save as Write/Run steps in F's directory.  A style that a person runs
        in a terminal (save() drives it with pexpect) gives the same save done by the
        program without one: what a reproduction outside stackcheck runs."""
        raise NotImplementedError

    def prepare(self, path, old, new, session, templates=None):
        """Lay out F holding `old` and what the save needs.  With templates (a directory
        kept for the run), steps that run programs (a repository made and committed to)
        run once per starting point, there, and F's directory gets a copy of what they
        made: the same files, at a fraction of the cost."""
        directory, name = os.path.split(path)
        steps = self.prepare_steps(name, old, new)
        # the copy is of F's directory alone: steps that touch HOME run every time
        if templates is None or all(isinstance(s, Write) for s in steps) or "{home}" in repr(steps):
            self.do(steps, directory, session)
            return
        template = os.path.join(templates, hashlib.sha256(repr((self.name, steps)).encode()).hexdigest()[:16])
        if not os.path.isdir(template):
            shutil.rmtree(template + ".new", ignore_errors=True)  # a failed attempt's
            os.makedirs(template + ".new")
            self.do(steps, template + ".new", session)
            os.rename(template + ".new", template)
        # copy, not copy2: the files' times are the layout's, as if the steps had just run here
        shutil.copytree(template, directory, symlinks=True, copy_function=shutil.copy, dirs_exist_ok=True)

    def save(self, path, new, style, session):
        """Run the program so that F ends up holding `new`; the backup's name or None."""
        self.do(self.save_steps(os.path.basename(path), new, style), os.path.dirname(path), session)
        return None

    def do(self, steps, directory, session):
        for s in steps:
            if isinstance(s, Write):
                with open(os.path.join(directory, s.path.replace("{home}", session.home)), "wb") as f:
                    f.write(s.data)
            else:
                self.run([word.replace("{home}", session.home) for word in s.argv], session, directory)

    def save_and_check(self, path, new, style, session):
        """save(), then make sure the program left no process of its own behind."""
        running = set(leftover_processes())  # a FUSE stack's daemon is the harness's child too
        backup = self.save(path, new, style, session)
        left = [p for p in leftover_processes() if p not in running]
        if left:
            raise ClientFailed(f"{self.name} ({style}) left processes running: {', '.join(left)}")
        return backup

    # -- helpers for the modules ------------------------------------------------------------
    def run(self, argv, session, cwd):
        """A non-interactive command on a pty; its output, or ClientFailed with it."""
        child = self.spawn(argv, session, cwd)
        output, status = self.finish(child, "its exit", check=False)
        if status != 0:
            shown = screen_text(output)
            last = shown.splitlines()[-1] if shown else "no output"
            raise ClientFailed(f"{' '.join(argv)} exited with status {status}: {last}\n{shown}")
        return output

    def spawn(self, argv, session, cwd):
        child = pexpect.spawn(argv[0], args=argv[1:], env=session.env(self.env), cwd=cwd, timeout=TIMEOUT,
                              encoding="utf-8", codec_errors="replace", dimensions=(24, 100))
        # pexpect sleeps 50 ms before every send, for programs that flush typeahead at a
        # prompt; these editors read their typeahead in order, and we send only once
        # their screen is up.
        child.delaybeforesend = None
        # ptyprocess sleeps 100 ms in close() for the child's exit status; after EOF close()
        # gets it from a blocking waitpid (finish), and the sleep only delays that.
        child.ptyproc.delayafterclose = 0
        return child

    @staticmethod
    def wait(child, pattern, what):
        """Wait for `pattern` on the program's screen; fail with the screen if it never comes."""
        try:
            child.expect(pattern)
        except (pexpect.TIMEOUT, pexpect.EOF) as e:
            kind = "timed out" if isinstance(e, pexpect.TIMEOUT) else "ended"
            shown = screen_text((child.before or "") + (child.buffer or ""))
            child.close(force=True)
            raise ClientFailed(f"{child.name} {kind} waiting for {what}; its screen:\n{shown}") from None

    @staticmethod
    def finish(child, what, check=True):
        """Wait for the program to exit by itself, with status 0 if check; its output
        since the last wait and its exit status."""
        Client.wait(child, pexpect.EOF, what)
        output = child.before
        child.close()
        if check and child.exitstatus != 0:
            raise ClientFailed(f"{child.name} exited with status {child.exitstatus} after {what}")
        return output, child.exitstatus


_VERSIONS = {}  # command -> its version line: asked once per process


def _version(client, session):
    if client.command not in _VERSIONS:
        output = client.run([client.command, "--version"], session, session.home)
        _VERSIONS[client.command] = screen_text(output).splitlines()[0]
    return _VERSIONS[client.command]


def leftover_processes():
    """This process's descendants that are not Python (the stack users are forks of
    the harness): a client's editor, daemon or helper still running."""
    left = []
    for pid in _descendants():
        try:
            proc = psutil.Process(pid)
            if proc.exe() != os.path.realpath(sys.executable) and proc.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{pid} {proc.name()}")
        except psutil.NoSuchProcess:
            continue
    return left


def _descendants():
    """This process's descendants, from the kernel's list of each thread's children: reads
    only these (psutil's children() reads every process on the machine, twice a save).
    psutil's where the kernel keeps no such lists (CONFIG_PROC_CHILDREN)."""
    me = os.getpid()
    if not os.path.exists(f"/proc/{me}/task/{me}/children"):
        return [p.pid for p in psutil.Process().children(recursive=True)]
    return _under(me)


def _under(pid):
    found = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:  # exited meanwhile
        return found
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                children = [int(child) for child in f.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
        for child in children:
            found += [child, *_under(child)]
    return found


for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
