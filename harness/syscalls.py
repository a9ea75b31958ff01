"""Thin ctypes wrappers for the system calls Python 3.11's os module lacks.

mount(2), umount2(2), syncfs(2), unshare(2), setns(2), inotify(7) and the new
mount API (open_tree, mount_setattr, move_mount) that idmapped mounts need.  Each wrapper
raises OSError with the real errno, like the os module does.
"""

import ctypes
import os

_libc = ctypes.CDLL(None, use_errno=True)

# x86_64 and the generic table share these numbers for the new mount API.
SYS_open_tree = 428
SYS_move_mount = 429
SYS_mount_setattr = 442

AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
AT_SYMLINK_FOLLOW = 0x400
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH = 0x00000004
MOUNT_ATTR_IDMAP = 0x00100000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_SHARED = 1 << 20

MNT_FORCE = 1
MNT_DETACH = 2

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000


def _check(result, what):
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def _b(value):
    return None if value is None else os.fsencode(value)


def mount(source, target, fstype, flags=0, data=None):
    _check(_libc.mount(_b(source), _b(target), _b(fstype), ctypes.c_ulong(flags), _b(data)),
           f"mount {fstype} on {target}")


def umount(target, flags=0):
    _check(_libc.umount2(_b(target), flags), f"umount {target}")


def syncfs(fd):
    _check(_libc.syncfs(fd), "syncfs")


def linkat_follow(source, target):
    """linkat(2) with AT_SYMLINK_FOLLOW: os.link() calls plain link(2), which
    links a /proc/self/fd magic link itself instead of the file it names."""
    _check(_libc.linkat(AT_FDCWD, _b(source), AT_FDCWD, _b(target), AT_SYMLINK_FOLLOW),
           f"linkat {source} {target}")


def linkat_empty(fd, new_dir_fd, new_name):
    """A new name for the object of an O_PATH fd (linkat with AT_EMPTY_PATH)."""
    _check(_libc.linkat(fd, b"", new_dir_fd, _b(new_name), AT_EMPTY_PATH), f"linkat {new_name}")


def fchownat_empty(fd, uid, gid):
    """chown the object of an O_PATH fd itself, symlinks included."""
    _check(_libc.fchownat(fd, b"", ctypes.c_uint(uid & 0xFFFFFFFF), ctypes.c_uint(gid & 0xFFFFFFFF),
                          AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW), "fchownat")


def renameat2(old_dir_fd, old_name, new_dir_fd, new_name, flags=0):
    _check(_libc.renameat2(old_dir_fd, _b(old_name), new_dir_fd, _b(new_name), ctypes.c_uint(flags)),
           f"renameat2 {old_name} {new_name}")


IN_CLOEXEC = os.O_CLOEXEC
IN_NONBLOCK = os.O_NONBLOCK
IN_ATTRIB = 0x00000004
IN_UNMOUNT = 0x00002000  # the watched object's filesystem (superblock) was shut down
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000


def inotify_init1(flags):
    return _check(_libc.inotify_init1(flags), "inotify_init1")


def inotify_add_watch(fd, path, mask):
    return _check(_libc.inotify_add_watch(fd, _b(path), ctypes.c_uint32(mask)), f"inotify_add_watch {path}")


def unshare(flags):
    _check(_libc.unshare(flags), "unshare")


def setns(fd, nstype=0):
    _check(_libc.setns(fd, nstype), "setns")


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def open_tree(path, flags):
    return _check(_libc.syscall(SYS_open_tree, AT_FDCWD, _b(path), ctypes.c_uint(flags)),
                  f"open_tree {path}")


def mount_setattr_idmap(tree_fd, userns_fd, recursive=False):
    attr = _MountAttr(attr_set=MOUNT_ATTR_IDMAP, userns_fd=userns_fd)
    flags = AT_EMPTY_PATH | (AT_RECURSIVE if recursive else 0)
    _check(_libc.syscall(SYS_mount_setattr, tree_fd, b"", ctypes.c_uint(flags),
                         ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr))),
           "mount_setattr MOUNT_ATTR_IDMAP")


def move_mount(tree_fd, target):
    _check(_libc.syscall(SYS_move_mount, tree_fd, b"", AT_FDCWD, _b(target),
                         ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH)),
           f"move_mount to {target}")
