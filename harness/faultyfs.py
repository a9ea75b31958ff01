"""The bundled faulty block device's daemon: one image file served through FUSE,
answering EIO for chosen byte ranges.

    python -m harness.faultyfs IMAGE MOUNTDIR [--ready-fd N]

MOUNTDIR/disk is the image (a loop device goes over it); MOUNTDIR/control
takes "fail START LENGTH" (bytes, repeatable), "fail all", "drop START LENGTH"
(writes there succeed and are thrown away, as dm-flakey's drop_writes) and
"heal" lines: once the write returns, the new set of ranges is in force.  The disk
is opened direct_io, so every block write of the loop device reaches this
daemon and an EIO here is an I/O error of the filesystem above.
"""

import argparse
import errno
import os
import stat
import sys

import pyfuse3
import trio
from pyfuse3 import FUSEError

DISK, CONTROL = 2, 3
NAMES = {b"disk": DISK, b"control": CONTROL}


class FaultyFS(pyfuse3.Operations):
    def __init__(self, image):
        super().__init__()
        self.fd = os.open(image, os.O_RDWR)
        self.size = os.fstat(self.fd).st_size
        self.failing = []  # [(start, end)]
        self.fail_all = False
        self.dropping = []  # [(start, end)]: writes succeed, nothing is written

    def _attr(self, inode):
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        attr.entry_timeout = attr.attr_timeout = 0
        if inode == pyfuse3.ROOT_INODE:
            attr.st_mode, attr.st_nlink = stat.S_IFDIR | 0o755, 2
        else:
            attr.st_mode, attr.st_nlink = stat.S_IFREG | 0o600, 1
            attr.st_size = self.size if inode == DISK else 0
        return attr

    async def lookup(self, parent_inode, name, ctx):
        if parent_inode != pyfuse3.ROOT_INODE or name not in NAMES:
            raise FUSEError(errno.ENOENT)
        return self._attr(NAMES[name])

    async def getattr(self, inode, ctx):
        return self._attr(inode)

    async def opendir(self, inode, ctx):
        return inode

    async def readdir(self, fh, start_id, token):
        for index, (name, inode) in enumerate(NAMES.items()):
            if index >= start_id and not pyfuse3.readdir_reply(token, name, self._attr(inode), index + 1):
                break

    async def open(self, inode, flags, ctx):
        return pyfuse3.FileInfo(fh=inode, direct_io=True)

    def _fails(self, offset, length):
        return self.fail_all or any(start < offset + length and offset < end for start, end in self.failing)

    async def read(self, fh, off, size):
        if fh != DISK:
            return b""
        if self._fails(off, size):
            raise FUSEError(errno.EIO)
        return os.pread(self.fd, size, off)

    async def write(self, fh, off, buf):
        if fh == CONTROL:
            for line in buf.decode().splitlines():
                words = line.split()
                if words == ["heal"]:
                    self.failing, self.fail_all, self.dropping = [], False, []
                elif words == ["fail", "all"]:
                    self.fail_all = True
                elif len(words) == 3 and words[0] in ("fail", "drop"):
                    start, length = int(words[1]), int(words[2])
                    (self.failing if words[0] == "fail" else self.dropping).append((start, start + length))
                else:
                    raise FUSEError(errno.EINVAL)
            return len(buf)
        if self._fails(off, len(buf)):
            raise FUSEError(errno.EIO)
        for start, end in self._kept(off, off + len(buf)):
            os.pwrite(self.fd, buf[start - off:end - off], start)
        return len(buf)

    def _kept(self, first, end):
        """The parts of [first, end) outside every dropping range."""
        parts = [(first, end)]
        for drop_start, drop_end in self.dropping:
            parts = [piece for start, stop in parts
                     for piece in ((start, min(stop, drop_start)), (max(start, drop_end), stop))
                     if piece[0] < piece[1]]
        return parts

    async def fsync(self, fh, datasync):
        if fh == DISK:
            os.fsync(self.fd)

    async def setattr(self, inode, attr, fields, fh, ctx):
        return self._attr(inode)  # truncating the control file on open(O_TRUNC)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m harness.faultyfs", description=__doc__)
    p.add_argument("image")
    p.add_argument("mountdir")
    p.add_argument("--ready-fd", type=int)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    pyfuse3.init(FaultyFS(args.image), args.mountdir, {"fsname=stackcheck-faultydev", "subtype=faultydev"})
    if args.ready_fd is not None:
        os.write(args.ready_fd, b"ready\n")
        os.close(args.ready_fd)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=False)


if __name__ == "__main__":
    main()
