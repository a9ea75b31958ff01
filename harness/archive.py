"""Debian's archive, through apt: its package lists brought up to date once a run,
what it offers, and downloads and installs, each within a time limit.

Every command that talks to a mirror ends within STACKCHECK_DOWNLOAD_TIMEOUT
seconds (default 600): a mirror that hangs ends in one line naming the package,
never in a hung run.  The queries (apt-cache) read the local lists only.
"""

import os
import re
import shutil
import signal
import subprocess
import tempfile

TIMEOUT_ENV = "STACKCHECK_DOWNLOAD_TIMEOUT"
DEFAULT_TIMEOUT = 600


class ArchiveError(Exception):
    """One line naming the package: the archive could not give it."""


def time_limit():
    return int(os.environ.get(TIMEOUT_ENV) or DEFAULT_TIMEOUT)


def _last_line(text):
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def _run(argv, log=None, **kwargs):
    """Run an apt command that talks to a mirror, its output appended to log.  It
    runs in a session of its own, so that apt's download methods end with it."""
    if not shutil.which(argv[0]):
        raise ArchiveError(f"no {argv[0]} here: Debian's archive cannot be reached from this machine")
    command = " ".join(a for a in argv if not a.startswith("-"))  # for people: "apt-get download P=V"
    if log:
        log.write(f"$ {' '.join(argv)}\n")
        log.flush()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", start_new_session=True, **kwargs)
    try:
        output, _ = proc.communicate(timeout=time_limit())
    except BaseException as e:  # the time limit, or an interrupt: apt and its methods end with it
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if isinstance(e, subprocess.TimeoutExpired):
            raise ArchiveError(f"{command}: no answer within {time_limit()} s (${TIMEOUT_ENV})") from None
        raise
    if log:
        log.write(output)
        log.flush()
    if proc.returncode:
        raise ArchiveError(f"{command} failed ({_last_line(output)})")


_update = {}  # this run's apt-get update: {"why": why it failed, or None}


def update(log=None):
    """apt-get update, once a run, so that a package name means the archive's current
    version.  Why it failed (the lists stay as they were), or None."""
    if not _update:
        try:
            _run(["apt-get", "update", "-qq"], log)
            _update["why"] = None
        except ArchiveError as e:
            _update["why"] = str(e)
    return _update["why"]


def candidate(package):
    """The fields of the version of package that apt would take ({} when the lists have none)."""
    if not shutil.which("apt-cache"):
        return {}
    done = subprocess.run(["apt-cache", "show", "--no-all-versions", package], capture_output=True, text=True)
    return dict(re.findall(r"^([\w-]+): (.*)$", done.stdout, re.M)) if done.returncode == 0 else {}


def versions(package):
    """The versions of package that the lists offer, newest first."""
    if not shutil.which("apt-cache"):
        return []
    listed = subprocess.run(["apt-cache", "madison", package], capture_output=True, text=True).stdout
    return list(dict.fromkeys(line.split("|")[1].strip() for line in listed.splitlines() if line.count("|") >= 2))


def download(package, version, directory, log=None):
    """apt-get download package=version (version None: apt's choice) into directory; the .deb's path."""
    os.makedirs(directory, exist_ok=True)
    # Into a directory of its own: apt-get's file name is the only thing there.
    staging = tempfile.mkdtemp(dir=directory, prefix=".download-")
    try:
        _run(["apt-get", "download", f"{package}={version}" if version else package], log, cwd=staging)
        (name,) = os.listdir(staging)
        os.replace(os.path.join(staging, name), os.path.join(directory, name))
        return os.path.join(directory, name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def install(packages, log=None):
    """apt-get install packages (what they need downloaded within the time limit)."""
    update(log)
    _run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages], log,
         env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
