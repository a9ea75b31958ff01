"""A FUSE daemon in the foreground, as libfuse's own tests run one.

Started as a subprocess, waited for until it says it has mounted (a ready fd,
then the mount table: no fixed sleep), stopped by unmounting; if it then
hangs, its connection is aborted through fusectl, and last it is killed.  A
daemon that died during the case is reported with its log, and its dead
mount ("Transport endpoint is not connected") is still removed.
"""

import logging
import os
import select
import signal
import subprocess
import sys
import time

from harness import mounts, rundir

log = logging.getLogger("stackcheck.fusedaemon")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STOP_WAIT = 10  # seconds a daemon gets to exit after its unmount, and after an abort


class DaemonFailed(RuntimeError):
    pass


def wait_for_mount(mountpoint, proc, timeout=30):
    """Wait until mountpoint is mounted or proc has died, on events: the mount
    table's POLLPRI when it changes, and a pidfd for the process's exit."""
    table = os.open("/proc/self/mountinfo", os.O_RDONLY | os.O_CLOEXEC)
    pidfd = os.pidfd_open(proc.pid)
    poller = select.poll()
    poller.register(table, select.POLLPRI | select.POLLERR)
    poller.register(pidfd, select.POLLIN)
    deadline = time.monotonic() + timeout
    try:
        while True:
            while os.read(table, 65536):  # reading re-arms the change notification
                pass
            os.lseek(table, 0, os.SEEK_SET)
            if mounts.is_mountpoint(mountpoint):
                return True
            if proc.poll() is not None:
                return False
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            poller.poll(remaining * 1000)
    finally:
        os.close(table)
        os.close(pidfd)


class FuseDaemon:
    """ready="fd": the daemon takes --ready-fd N (stackfs); ready="mount": a
    daemon of another project, ready when its mount appears."""

    def __init__(self, argv, mountpoint, workdir, name, ready="fd", stop_wait=STOP_WAIT):
        self.ready = ready
        self.stop_wait = stop_wait
        self.argv = argv
        # Resolved now: once mounted, resolving it would ask a daemon that may hang.
        self.mountpoint = os.path.realpath(mountpoint)
        self.workdir = workdir
        self.name = name
        self.log_path = os.path.join(workdir, f"{name}.log")
        self.proc = None

    def log_text(self):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-8000:]
        except OSError:
            return ""

    def start(self):
        env = dict(os.environ, PYTHONPATH=ROOT)
        ready_r, ready_w = os.pipe() if self.ready == "fd" else (None, None)
        argv = self.argv + (["--ready-fd", str(ready_w)] if ready_w is not None else [])
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, pass_fds=(ready_w,) if ready_w is not None else (),
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                                         start_new_session=True)  # a ^C to the run goes to us, not it
        rundir.record_process(self.workdir, self.proc.pid, f"{self.name} daemon")
        try:
            if ready_w is not None:
                os.close(ready_w)
                with os.fdopen(ready_r, "rb") as ready:
                    ok = ready.read() == b"ready\n"  # or nothing, if it died first
            else:
                ok = wait_for_mount(self.mountpoint, self.proc)
        except BaseException:
            self.stop()
            raise
        if self.proc.poll() == 0 and mounts.is_mountpoint(self.mountpoint):
            self.stop()
            raise DaemonFailed(self._went_to_background())
        if not ok or not mounts.is_mountpoint(self.mountpoint):
            self.stop()
            raise DaemonFailed(f"{self.name} did not mount {self.mountpoint}; its log:\n{self.log_text()}")

    def _went_to_background(self):
        return (f"{self.name} exited with status 0 and left its mount served by a background process: "
                "the daemon must stay in the foreground (for most FUSE programs: -f)")

    def stop(self):
        """Unmount and end the daemon; returns a problem to report, or None."""
        if self.proc is None:
            return None
        died_early = self.proc.poll() is not None
        problem = None
        if died_early and self.proc.returncode == 0 and mounts.is_mountpoint(self.mountpoint):
            problem = self._went_to_background()
        elif died_early:
            problem = (f"{self.name} died during the case (exit status {self.proc.returncode}); "
                       f"its log:\n{self.log_text()}")
        ours = [m for m in mounts.table() if m.mountpoint == self.mountpoint
                and m.fstype.startswith("fuse")]
        mounts.unmount(self.mountpoint)  # a dead or hung daemon's mount is detached lazily
        # The connection outlives our unmount while another mount namespace (a container
        # made by a case on another worker) holds a copy: end it now, that is no hang.
        holders = mounts.namespaces_holding(ours[-1].device) if ours and not died_early else []
        if holders:
            log.info("%s: its mount is still held in the mount namespaces of pids %s; connection aborted",
                     self.name, holders)
            mounts.abort_fuse_device(ours[-1].device)
        try:
            self.proc.wait(timeout=self.stop_wait)
        except subprocess.TimeoutExpired:
            problem = f"{self.name} hung after its unmount; connection aborted through fusectl"
            if ours:
                mounts.abort_fuse_device(ours[-1].device)
            try:
                self.proc.wait(timeout=self.stop_wait)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGKILL)
                self.proc.wait()
        rundir.forget_process(self.workdir, self.proc.pid)
        self.proc = None
        return problem


def python_module(module, *args):
    """argv that runs one of stackcheck's own modules with this interpreter."""
    return [sys.executable, "-m", module, *args]
