"""The mount table (/proc/self/mountinfo) and unmounting what lies under a path."""

import contextlib
import errno
import os
import re
import select
import struct
import tempfile
import time
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


def bind_shared(path):
    """Bind path on itself as a shared mount.  Every mount made below it is then
    shared too, and the copy that a container's new mount namespace takes of it
    is a slave (mount_namespaces(7): copied into a less privileged user
    namespace), so our umount reaches that copy.  A private copy would keep the
    filesystem alive in another worker's container after our umount, and
    overlayfs then refuses to mount the same upperdir again (EBUSY)."""
    syscalls.mount(path, path, None, syscalls.MS_BIND)
    syscalls.mount(None, path, None, syscalls.MS_SHARED)


def processes_using(mount_id, path):
    """'pid (name): what' for processes with an open file (by the mount id in
    fdinfo), working directory or root on the mount."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        uses = []
        try:
            for fd in os.listdir(f"/proc/{pid}/fdinfo"):
                with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                    if f"mnt_id:\t{mount_id}\n" in f.read():
                        uses.append(f"fd {fd}")
            for link in ("cwd", "root"):
                target = os.readlink(f"/proc/{pid}/{link}")
                if target == path or target.startswith(path + "/"):
                    uses.append(link)
            if uses:
                with open(f"/proc/{pid}/comm") as f:
                    found.append(f"{pid} ({f.read().strip()}): {', '.join(uses)}")
        except OSError:  # gone, or a kernel thread
            continue
    return found


SUPERBLOCK_RELEASE_TIMEOUT = 10.0
_EVENT = struct.Struct("iIII")  # struct inotify_event without its name


class StillMounted(RuntimeError):
    """A filesystem outlived its umount: something still holds it."""


class SuperblockWatch:
    """Tells when the filesystem mounted at a path is gone, not only unmounted
    here.  inotify reports IN_UNMOUNT for a watched inode when its superblock
    shuts down, which happens only when no mount of it is left in any
    namespace and no file of it is open: the condition for mounting the same
    layers or the same device again."""

    def __init__(self, path, what):
        self.path = os.path.realpath(path)
        self.what = what
        st = os.stat(self.path)
        self.device = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
        self.mount_id = next((m.mount_id for m in reversed(table()) if m.mountpoint == self.path), None)
        self._fd = syscalls.inotify_init1(syscalls.IN_CLOEXEC | syscalls.IN_NONBLOCK)
        try:
            syscalls.inotify_add_watch(self._fd, self.path, syscalls.IN_ATTRIB | syscalls.IN_ONLYDIR)
        except OSError:
            os.close(self._fd)
            raise

    def _shut_down(self, timeout):
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not poller.poll(left * 1000):
                break
            events = os.read(self._fd, 65536)
            while events:
                _, mask, _, name_len = _EVENT.unpack_from(events)
                if mask & (syscalls.IN_UNMOUNT | syscalls.IN_IGNORED):
                    return True
                events = events[_EVENT.size + name_len:]
        return False

    def wait_gone(self, timeout=SUPERBLOCK_RELEASE_TIMEOUT):
        """Return once the filesystem is gone; after timeout, raise StillMounted
        naming what still holds it."""
        if self._shut_down(timeout):
            return
        holders = [f"mount namespace of pid {pid}" for pid in namespaces_holding(self.device)]
        if self.mount_id is not None:
            holders += processes_using(self.mount_id, self.path)
        raise StillMounted(f"{self.what}: its filesystem ({self.device}) is still alive {timeout:g} s after "
                           f"umount of {self.path}; held by: {'; '.join(holders) or 'nothing found'}")

    def close(self):
        os.close(self._fd)


@contextlib.contextmanager
def superblock_gone(path, what):
    """Around an unmount of the filesystem at path: the block ends only once
    that filesystem is gone everywhere (see SuperblockWatch)."""
    watch = SuperblockWatch(path, what)
    try:
        yield
        watch.wait_gone()
    finally:
        watch.close()


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
