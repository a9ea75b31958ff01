"""Where a file's data lies on its device: the FS_IOC_FIEMAP ioctl.

A fault backend fails exactly those bytes, so that only the file's data
writes fail (failing the journal would abort the filesystem instead).
"""

import fcntl
import os
import struct

FS_IOC_FIEMAP = 0xC020660B
FIEMAP_FLAG_SYNC = 0x1
_HEADER = struct.Struct("=QQIIII")          # start, length, flags, mapped, count, reserved
_EXTENT = struct.Struct("=QQQQQIIII")       # logical, physical, length, 2 reserved, flags, 3 reserved
MAX_EXTENTS = 256


def extents(path):
    """[(physical byte offset, length)] of path's data, after syncing it."""
    request = bytearray(_HEADER.pack(0, 0xFFFFFFFFFFFFFFFF, FIEMAP_FLAG_SYNC, 0, MAX_EXTENTS, 0)
                        + b"\0" * (_EXTENT.size * MAX_EXTENTS))
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.ioctl(fd, FS_IOC_FIEMAP, request)
    finally:
        os.close(fd)
    mapped = _HEADER.unpack_from(request)[3]
    found = []
    for i in range(mapped):
        _, physical, length, *_ = _EXTENT.unpack_from(request, _HEADER.size + i * _EXTENT.size)
        found.append((physical, length))
    return found


def read_on_device(path, device):
    """path's data as the device holds it, read around every cache (O_DIRECT on
    the block device at path's extents): what a crash or a remount would find."""
    import mmap
    size = os.stat(path).st_size
    chunks = []
    fd = os.open(device, os.O_RDONLY | os.O_DIRECT)
    try:
        for physical, length in extents(path):
            buf = mmap.mmap(-1, length)  # page-aligned, as O_DIRECT needs
            os.preadv(fd, [buf], physical)
            chunks.append(bytes(buf))
            buf.close()
    finally:
        os.close(fd)
    return b"".join(chunks)[:size]
