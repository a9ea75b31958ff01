"""Processes that act as a stack's user: host root, or a container's root.

A case's scenario runs in a forked child, so every fd it opens is closed when
it ends, whatever happened, and the stack can always be unmounted after it.
A container is a child in its own user namespace (container 0..65535 = host
100000..165535, like LXD's default) and mount namespace; the same mechanism
makes the user namespace fd that idmapped mounts are built from.
"""

import ctypes
import os
import pickle
import signal
import socket
import sys
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection

from harness import syscalls

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class IdMap:
    """One uid/gid range: ids inside..inside+count-1 are outside.. on the host."""
    inside: int = 0
    outside: int = 100000
    count: int = 65536

    def line(self):
        return f"{self.inside} {self.outside} {self.count}\n"

    def to_host(self, container_id):
        if not 0 <= container_id - self.inside < self.count:
            raise ValueError(f"id {container_id} is outside the map {self}")
        return container_id - self.inside + self.outside


CONTAINER_MAP = IdMap()
OVERFLOW_ID = 65534  # what an unmapped id shows as (/proc/sys/kernel/overflowuid)


def die_with_parent():
    """In a child (a subprocess preexec_fn): be killed when the process that started
    it dies, however it dies, SIGKILL included."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class ChildFailed(Exception):
    """The child died without reporting (killed, crashed)."""


def _read_all(fd):
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _fork(body, idmap=None, new_mount_ns=True, join=None):
    """Fork a child that enters a new user namespace whose map the parent
    writes (or joins the user and mount namespaces of process `join`), becomes
    that namespace's root, runs body() and exits.  The child never returns
    into the caller's code, whatever fails.

    Returns (pid, go_fd) in the parent: the child waits until the parent
    writes b"g" to go_fd.  Pipes, not sleeps, order the two sides.
    """
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.close(ready_r)
            os.close(go_w)
            _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            if join is not None:
                idmap = idmap or CONTAINER_MAP  # joined: become that container's root
                # Open both before joining: once in the container's user namespace we
                # could not open them while `join` is briefly non-dumpable (its setresuid).
                fds = [os.open(f"/proc/{join}/ns/{ns}", os.O_RDONLY) for ns in ("user", "mnt")]
                for fd in fds:
                    syscalls.setns(fd)
                    os.close(fd)
            elif idmap is not None:
                syscalls.unshare(syscalls.CLONE_NEWUSER | (syscalls.CLONE_NEWNS if new_mount_ns else 0))
            os.write(ready_w, b"r")
            os.close(ready_w)
            ready_w = None
            if os.read(go_r, 1) == b"g":
                os.close(go_r)
                if idmap is not None:
                    os.setgroups([])
                    os.setresgid(idmap.inside, idmap.inside, idmap.inside)
                    os.setresuid(idmap.inside, idmap.inside, idmap.inside)
                    # setuid clears "dumpable"; without it the container's own processes
                    # could not open each other's /proc/<pid>/fd links (scenario S1.3).
                    _libc.prctl(PR_SET_DUMPABLE, 1)
                    # ...and the parent-death signal: set it again, so that a killed
                    # harness never leaves container processes behind.
                    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
                    if os.getppid() != parent:
                        raise ChildFailed("the harness died while the child started")
                body()
                status = 0
        except BaseException:  # noqa: BLE001 - reported, and the child ends here
            text = traceback.format_exc()
            try:
                if ready_w is not None:
                    os.write(ready_w, b"E" + text.encode())
                else:
                    sys.stderr.write(text)
                    sys.stderr.flush()
            finally:
                os._exit(1)
        finally:
            os._exit(status)
    os.close(ready_w)
    os.close(go_r)
    try:
        answer = _read_all(ready_r)
        if answer != b"r":
            raise ChildFailed("the child could not enter its namespaces:\n"
                              + (answer[1:].decode(errors="replace") or "it died"))
        if idmap is not None and join is None:
            for name in ("uid_map", "gid_map"):
                with open(f"/proc/{pid}/{name}", "w") as f:
                    f.write(idmap.line())
    except BaseException:
        os.close(go_w)
        _reap(pid)
        raise
    finally:
        os.close(ready_r)
    return pid, go_w


def _reap(pid):
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    os.waitpid(pid, 0)


class Child:
    """A running stack-user process with a channel to it (send/recv of objects).

    A failure in the child is raised in the parent by recv() or result().
    """

    def __init__(self, pid, channel, name):
        self.pid = pid
        self.channel = channel
        self.name = name

    def send(self, obj):
        self.channel.send(obj)

    def recv(self):
        kind, value = self._next()
        if kind != "message":
            self.close()
            raise ChildFailed(f"{self.name} ended before sending the message the parent waits for")
        return value

    def result(self):
        try:
            while True:
                kind, value = self._next()
                if kind == "result":
                    return value
        finally:
            self.close()

    def _next(self):
        try:
            kind, value = self.channel.recv()
        except EOFError:
            self.close()
            raise ChildFailed(f"process running {self.name} died without a result") from None
        if kind == "error":
            self.close()
            raise value
        return kind, value

    def close(self):
        if self.pid:
            self.channel.close()
            _reap(self.pid)
            self.pid = None


class _ChildChannel:
    """The child's end: what fn uses to talk to the parent."""

    def __init__(self, conn):
        self._conn = conn

    def send(self, obj):
        self._conn.send(("message", obj))

    def recv(self):
        return self._conn.recv()


def start(fn, *args, idmap=None, new_mount_ns=True, join=None):
    """Start fn(channel, *args) in a child (as container root when idmap is
    given; inside the namespaces of the Holder process `join` when given)."""
    parent_end, child_end = socket.socketpair()

    def body():
        parent_end.close()
        conn = Connection(child_end.detach())
        try:
            message = ("result", fn(_ChildChannel(conn), *args))
        except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent
            text = traceback.format_exc()
            try:
                pickle.dumps(exc)
            except Exception:  # an unpicklable exception still reports its text
                exc = RuntimeError(text)
            exc.add_note("in the stack user's process:\n" + text)
            message = ("error", exc)
        sys.stdout.flush()
        sys.stderr.flush()
        conn.send(message)

    try:
        pid, go_w = _fork(body, idmap, new_mount_ns, join)
    finally:
        child_end.close()
    os.write(go_w, b"g")
    os.close(go_w)
    return Child(pid, Connection(parent_end.detach()), getattr(fn, "__name__", "fn"))


def run(fn, *args, idmap=None, new_mount_ns=True, join=None):
    """fn(*args) in a child as start() makes it; returns what fn returns, and
    raises again here what fn raised (with the child's traceback as a note)."""
    return start(lambda _channel, *a: fn(*a), *args, idmap=idmap,
                 new_mount_ns=new_mount_ns, join=join).result()


def userns_fd(idmap=CONTAINER_MAP):
    """An fd on a fresh user namespace with idmap, as MOUNT_ATTR_IDMAP wants."""
    hold_r, hold_w = os.pipe()
    pid, go_w = _fork(lambda: os.read(hold_r, 1), idmap, new_mount_ns=False)  # lives until we let go
    os.close(hold_r)
    try:
        os.write(go_w, b"g")
        return os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(go_w)
        os.close(hold_w)
        _reap(pid)


class Holder:
    """A container process that stays alive to hold its namespaces and the
    mounts made in them (shiftfs is mounted from inside the container)."""

    def __init__(self, idmap, setup, *args):
        result_r, result_w = os.pipe()
        hold_r, self._hold_w = os.pipe()

        def body():
            os.close(result_r)
            os.close(self._hold_w)
            try:
                setup(*args)
            except BaseException:
                os.write(result_w, traceback.format_exc().encode())
                raise
            os.write(result_w, b"ok")
            os.close(result_w)
            os.read(hold_r, 1)  # until stop() closes the other end

        self.pid, go_w = _fork(body, idmap)
        os.close(result_w)
        os.close(hold_r)
        try:
            os.write(go_w, b"g")
            os.close(go_w)
            answer = _read_all(result_r).decode()
        finally:
            os.close(result_r)
        if answer != "ok":
            self.stop()
            raise ChildFailed(f"container set-up failed:\n{answer}")

    def stop(self):
        if self.pid:
            os.close(self._hold_w)
            _reap(self.pid)
            self.pid = None
