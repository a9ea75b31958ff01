"""The mount table (/proc/self/mountinfo) and unmounting what lies under a path."""

import contextlib
import errno
import os
import re
import tempfile
from dataclasses import dataclass

from harness import syscalls


@dataclass(frozen=True)
class Mount:
    mount_id: int
    device: str  # "major:minor"
    mountpoint: str
    fstype: str
    source: str
    options: str  # per-mount and per-superblock options together


def _unescape(field):
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def table(path="/proc/self/mountinfo"):
    mounts = []
    with open(path) as f:
        for line in f:
            left, right = line.rstrip("\n").split(" - ", 1)
            fields = left.split()
            fstype, source, super_opts = (right.split(" ") + ["", ""])[:3]
            mounts.append(Mount(int(fields[0]), fields[2], _unescape(fields[4]), fstype,
                                _unescape(source), fields[5] + "," + super_opts))
    return mounts


def under(directory, mount_table=None):
    """Mounts at or below directory, deepest (most recently stacked) first."""
    directory = os.path.realpath(directory).rstrip("/")
    found = [m for m in (mount_table or table())
             if m.mountpoint == directory or m.mountpoint.startswith(directory + "/")]
    return sorted(found, key=lambda m: (m.mountpoint.count("/"), m.mount_id), reverse=True)


def is_mountpoint(path):
    path = os.path.realpath(path)
    return any(m.mountpoint == path for m in table())


@contextlib.contextmanager
def fusectl():
    """/sys/fs/fuse/connections, or a private fusectl mount while it is needed."""
    standard = "/sys/fs/fuse/connections"
    if is_mountpoint(standard):
        yield standard
        return
    path = tempfile.mkdtemp(prefix="stackcheck-fusectl-")
    syscalls.mount("stackcheck-fusectl", path, "fusectl", 0, None)
    try:
        yield path
    finally:
        unmount(path)
        os.rmdir(path)


def abort_fuse_device(device):
    """Abort the FUSE connection of a mount's device ("major:minor"; its fusectl
    entry is the minor) so that a hung or dead daemon cannot block unmount."""
    try:
        with fusectl() as connections:
            with open(os.path.join(connections, device.split(":")[1], "abort"), "w") as f:
                f.write("1")
    except OSError:
        pass


def namespaces_holding(device):
    """Pids, one per other mount namespace, whose mount table still has a mount of
    `device` ("major:minor"): a process that made its own mount namespace (a
    container of a case on another worker) holds copies of every mount there was."""
    own = os.stat("/proc/self/ns/mnt").st_ino
    seen, holders = {own}, []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            namespace = os.stat(f"/proc/{pid}/ns/mnt").st_ino
            if namespace in seen:
                continue
            seen.add(namespace)
            if any(m.device == device for m in table(f"/proc/{pid}/mountinfo")):
                holders.append(int(pid))
        except OSError:  # gone, or a kernel thread
            continue
    return holders


def unmount(path, lazy_fallback=True):
    """Unmount path; if busy, detach it lazily rather than leave it mounted."""
    try:
        syscalls.umount(path)
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.ENOENT):  # not mounted (any more)
            return
        if e.errno == errno.EBUSY and lazy_fallback:
            syscalls.umount(path, syscalls.MNT_DETACH)
            return
        raise


def unmount_all_under(directory):
    """Unmount everything below directory, deepest first; returns what it found."""
    found = under(directory)
    for m in found:
        if m.fstype.startswith("fuse"):
            abort_fuse_device(m.device)
        unmount(m.mountpoint)
    return found
