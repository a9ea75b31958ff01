"""The run directory: everything a run creates lives under it, tagged "stackcheck".

<base>/run-<pid>-<random>/owner records the owning process (pid and its start
time in clock ticks after boot, so a recycled pid is not mistaken for the
owner, and a change of the wall clock cannot make a live run look dead).  A run
directory appears under its run-* name only once its owner record is in it: a
run starting beside a recovery is never taken for a dead one.  A run killed with
SIGKILL leaves that record behind; the next run finds it and removes what the
dead run left: FUSE connections aborted, mounts below the directory unmounted
deepest first, loop devices over its images detached, dm devices with its
prefix removed, recorded zram devices removed, recorded daemons killed, then the directory itself.
"""

import json
import os
import shutil
import signal
import tempfile


from harness import loopdev, mounts

TAG = "stackcheck"
STAGING = ".new-run-"  # a run directory being made: renamed to run-* once its owner record is in


def default_base():
    return os.path.join(tempfile.gettempdir(), TAG)


def _start_time(pid):
    """When pid started, in clock ticks after boot (/proc/<pid>/stat), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _alive(record):
    start = _start_time(record.get("pid"))
    return start is not None and start == record.get("start")


def unreachable(directory):
    """Why container users (host uid 100000+) cannot walk down to directory, or None."""
    path = os.path.realpath(directory)
    while True:
        if not os.stat(path).st_mode & 0o001:
            return (f"run directory base {directory} is not reachable by container users: "
                    f"{path} has mode {os.stat(path).st_mode & 0o777:o} (needs o+x)")
        if path == "/":
            return None
        path = os.path.dirname(path)


def record_process(directory, pid, what):
    """Remember a daemon (in a directory of the run) so that a crashed run's
    successor can kill it."""
    with open(os.path.join(directory, f"pid.{pid}"), "w") as f:
        json.dump({"pid": pid, "start": _start_time(pid), "what": what}, f)


def forget_process(directory, pid):
    try:
        os.unlink(os.path.join(directory, f"pid.{pid}"))
    except FileNotFoundError:
        pass


def _recorded_processes(top):
    for directory, _, files in os.walk(top):
        for name in sorted(f for f in files if f.startswith("pid.")):
            try:
                with open(os.path.join(directory, name)) as f:
                    yield json.load(f)
            except (OSError, ValueError):
                continue


class RunDir:
    def __init__(self, path):
        self.path = path
        self.run_id = os.path.basename(path)

    @classmethod
    def create(cls, base=None):
        base = base or default_base()
        os.makedirs(base, mode=0o755, exist_ok=True)
        problem = unreachable(base)
        if problem:
            raise RuntimeError(problem)
        staging = tempfile.mkdtemp(prefix=f"{STAGING}{os.getpid()}-", dir=base)
        os.chmod(staging, 0o755)  # container users must be able to walk to the stack mounts
        with open(os.path.join(staging, "owner"), "w") as f:
            json.dump({"pid": os.getpid(), "start": _start_time(os.getpid())}, f)
        path = os.path.join(base, "run-" + os.path.basename(staging)[len(STAGING):])
        os.rename(staging, path)
        run = cls(path)
        # Every mount of the run lies below this shared mount, so that a container's
        # copy of it goes when we unmount it (mounts.bind_shared); remove() undoes it.
        mounts.bind_shared(path)
        return run

    def sub(self, *parts):
        path = os.path.join(self.path, *parts)
        os.makedirs(path, exist_ok=True)
        return path

    @property
    def dm_prefix(self):
        """Device-mapper names of this run start with this."""
        return f"{TAG}-{self.run_id}-"

    def owner_alive(self):
        try:
            with open(os.path.join(self.path, "owner")) as f:
                return _alive(json.load(f))
        except (OSError, ValueError):
            return False

    def remove(self):
        """Tear down everything under the run directory; returns what was found."""
        found = []
        for rec in _recorded_processes(self.path):
            if _alive(rec):
                found.append(f"process {rec['pid']} ({rec['what']})")
                os.kill(rec["pid"], signal.SIGKILL)
        found += [f"mount {m.mountpoint} ({m.fstype})" for m in mounts.unmount_all_under(self.path)
                  if m.mountpoint != os.path.realpath(self.path)]  # but the run's own shared bind
        from harness import dmdev  # late: only runs that may have dm devices need it
        for name in dmdev.remove_with_prefix(self.dm_prefix):
            found.append(f"dm device {name}")
        from harness import zram
        found += [f"zram device {dev}" for dev in zram.remove_recorded(self.path)]
        for dev in loopdev.backed_by(self.path):
            found.append(f"loop device {dev}")
            loopdev.force_detach(dev)
        shutil.rmtree(self.path, ignore_errors=True)
        return found


def recover_leftovers(base=None):
    """Remove the run directories of runs that died; returns a line per leftover."""
    base = base or default_base()
    report = []
    if not os.path.isdir(base):
        return report
    for name in sorted(os.listdir(base)):
        if name.startswith(STAGING) and _start_time(int(name[len(STAGING):].split("-")[0])) is None:
            shutil.rmtree(os.path.join(base, name), ignore_errors=True)  # died while being born: nothing mounted
            continue
        if not name.startswith("run-"):
            continue
        run = RunDir(os.path.join(base, name))
        if run.owner_alive():
            continue
        for what in run.remove():
            report.append(f"{run.run_id}: removed leftover {what}")
    return report
