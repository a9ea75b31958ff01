"""Loop devices over stackcheck's own image files, through the loop ioctls.

Devices are configured with LO_FLAGS_AUTOCLEAR and held open by their owner:
if the owner is killed, the kernel detaches the device as soon as nothing
mounts it any more, so a crashed run leaks at most what is still mounted.
"""

import errno
import fcntl
import os
import struct

LOOP_CLR_FD = 0x4C01
LOOP_CONFIGURE = 0x4C0A
LOOP_CTL_GET_FREE = 0x4C82
LO_FLAGS_AUTOCLEAR = 4

# struct loop_info64: 5 u64, 4 u32, file name[64], crypt name[64], key[32], 2 u64
_INFO64 = struct.Struct("=5Q4I64s64s32s2Q")
# struct loop_config: u32 fd, u32 block_size, loop_info64, 8 reserved u64
_CONFIG = struct.Struct(f"=II{_INFO64.size}s64x")


class LoopDevice:
    def __init__(self, image):
        self.image = os.fspath(image)
        self.path = None
        self.fd = None

    def attach(self):
        backing = os.open(self.image, os.O_RDWR | os.O_CLOEXEC)
        try:
            info = _INFO64.pack(0, 0, 0, 0, 0, 0, 0, 0, LO_FLAGS_AUTOCLEAR,
                                os.fsencode(os.path.basename(self.image))[:63], b"", b"", 0, 0)
            config = _CONFIG.pack(backing, 0, info)
            ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
            try:
                for _ in range(64):  # another process may take the free device first
                    number = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
                    path = f"/dev/loop{number}"
                    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
                    try:
                        fcntl.ioctl(fd, LOOP_CONFIGURE, config)
                    except OSError as e:
                        os.close(fd)
                        if e.errno == errno.EBUSY:
                            continue
                        raise
                    self.path, self.fd = path, fd
                    return self
                raise OSError(errno.EBUSY, "no free loop device after 64 tries")
            finally:
                os.close(ctl)
        finally:
            os.close(backing)

    def detach(self):
        if self.fd is None:
            return
        try:
            fcntl.ioctl(self.fd, LOOP_CLR_FD)
        except OSError as e:
            if e.errno != errno.ENXIO:  # already cleared by autoclear
                raise
        finally:
            os.close(self.fd)
            self.fd = None

    def __repr__(self):
        return f"LoopDevice({self.path} -> {self.image})"


def backed_by(directory):
    """Loop devices whose backing file lies under directory: /dev/loopN paths."""
    directory = os.path.realpath(directory).rstrip("/") + "/"
    found = []
    try:
        names = os.listdir("/sys/block")
    except FileNotFoundError:
        return found
    for name in names:
        if not name.startswith("loop"):
            continue
        try:
            with open(f"/sys/block/{name}/loop/backing_file") as f:
                backing = f.read().strip()
        except OSError:
            continue
        if backing.startswith(directory):
            found.append(f"/dev/{name}")
    return found


def force_detach(device):
    """Detach a leftover device of a dead run (a no-op if it went already)."""
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return
    try:
        fcntl.ioctl(fd, LOOP_CLR_FD)
    except OSError:
        pass
    finally:
        os.close(fd)
