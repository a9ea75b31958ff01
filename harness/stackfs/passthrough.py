"""stackfs' shift mode: one source directory, passed through with ids shifted.

The model is libfuse's passthrough_hp: every inode the kernel knows is an
O_PATH fd on the underlying object, so an unlinked file stays reachable (fstat,
reopen through /proc/self/fd) for as long as the kernel holds the inode.
Inode numbers are the underlay's, so they are stable across lookups and
forgets.

Caching: lookups and attributes time out at once (every path walk asks the
daemon, which asks the underlay), so a change made on the underlay shows at
the next lookup, with no timer involved.  The page cache is kept across opens
while the file's mtime, ctime and size are unchanged.  No writeback cache: with
it the kernel trusts its own size and mtime, and a file rewritten in place on
the underlay reads stale (stack/012 fails; measured, and no faster here).
"""

import errno
import functools
import inspect
import logging
import os
import stat

import pyfuse3
from pyfuse3 import FUSEError

from harness import syscalls
from harness.stackfs import idmapping

log = logging.getLogger("stackfs")
STALE_TIMEOUT = 3600.0  # the stale-dentry bug: the kernel trusts its caches for an hour
HIGH_INODES = 1 << 48   # numbers for inodes whose own number is taken (another device, or 1)


def _fuse_errors(method):
    """Underlay errors go back to the kernel as their errno; a bug of stackfs
    itself is logged with its traceback and answered with EIO."""
    @functools.wraps(method)
    async def wrapper(*args, **kwargs):
        try:
            return await method(*args, **kwargs)
        except FUSEError:
            raise
        except OSError as e:
            raise FUSEError(e.errno) from None
        except Exception:
            log.exception("stackfs bug in %s", method.__name__)
            raise FUSEError(errno.EIO) from None
    return wrapper


class _ErrnoMeta(type(pyfuse3.Operations)):
    def __new__(mcs, name, bases, namespace):
        for key, value in list(namespace.items()):
            if inspect.iscoroutinefunction(value) and not key.startswith("_"):
                namespace[key] = _fuse_errors(value)
        return super().__new__(mcs, name, bases, namespace)


class Node:
    # rel and layer: the merged path and the layer shown, in union mode
    __slots__ = ("inode", "fd", "lookups", "keys", "stat", "open_signature", "sync_error", "rel", "layer")

    def __init__(self, inode, fd, st):
        self.inode, self.fd, self.lookups = inode, fd, 0
        self.rel = self.layer = None
        self.keys = [(st.st_dev, st.st_ino)]  # union mode adds the upper copy's
        self.stat = st
        self.open_signature = None
        self.sync_error = 0

    @property
    def proc(self):
        return f"/proc/self/fd/{self.fd}"


class ShiftFS(pyfuse3.Operations, metaclass=_ErrnoMeta):
    enable_acl = True
    supports_dot_lookup = False

    def __init__(self, source, idmap, bugs=frozenset()):
        super().__init__()
        self.ids = idmapping.IdShift(idmap)
        self.bugs = bugs
        self.entry_timeout = STALE_TIMEOUT if "stale-dentry" in bugs else 0.0
        self.nodes = {}
        self.by_key = {}
        self.names = {}     # stale-dentry: (parent inode, name) -> inode (0: absent), never revalidated
        self.kept = {}      # renamed-lower: (parent inode, name) -> the Node it was found as
        self.handles = {}   # fh -> Node, for per-file sync bookkeeping
        self.dirs = {}      # fh -> directory listing, taken at the first readdir
        self._next_high = HIGH_INODES
        root_fd = os.open(source, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        st = os.fstat(root_fd)
        self.dev = st.st_dev
        self._remember(pyfuse3.ROOT_INODE, root_fd, st).lookups = 1

    # -- the inode table ---------------------------------------------------------
    def _remember(self, inode, fd, st):
        node = Node(inode, fd, st)
        self.nodes[inode] = node
        self.by_key[node.keys[0]] = inode
        return node

    def _number_for(self, st):
        if st.st_dev == self.dev and st.st_ino > 1 and st.st_ino < HIGH_INODES and st.st_ino not in self.nodes:
            return st.st_ino
        self._next_high += 1
        return self._next_high

    def _node_at(self, parent, name):
        """The node of name in parent (looked up on the underlay now), lookup count +1."""
        return self._adopt(os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent.fd))

    def _adopt(self, fd):
        """The node of the object an O_PATH fd names (the fd is kept or closed), lookup count +1."""
        st = os.fstat(fd)
        inode = self.by_key.get((st.st_dev, st.st_ino))
        if inode is None:
            node = self._remember(self._number_for(st), fd, st)
        else:
            os.close(fd)
            node = self.nodes[inode]
            node.stat = st
        node.lookups += 1
        return node

    def _entry(self, node, st=None):
        st = st or node.stat
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = node.inode
        attr.generation = 0
        attr.entry_timeout = self.entry_timeout
        attr.attr_timeout = 0.0
        attr.st_mode = st.st_mode
        attr.st_nlink = st.st_nlink
        attr.st_uid = self.ids.to_host(st.st_uid)
        attr.st_gid = self.ids.to_host(st.st_gid)
        attr.st_rdev = st.st_rdev
        attr.st_size = st.st_size
        attr.st_blksize = st.st_blksize
        attr.st_blocks = st.st_blocks
        attr.st_atime_ns = st.st_atime_ns
        attr.st_mtime_ns = st.st_mtime_ns
        attr.st_ctime_ns = st.st_ctime_ns
        return attr

    def _fresh_stat(self, node):
        node.stat = os.fstat(node.fd)
        if ("unlinked-special" in self.bugs and node.stat.st_nlink == 0
                and not (stat.S_ISREG(node.stat.st_mode) or stat.S_ISDIR(node.stat.st_mode))):
            raise FUSEError(errno.ENOENT)
        return node.stat

    # -- lookups and attributes --------------------------------------------------------
    async def lookup(self, parent_inode, name, ctx):
        if "stale-dentry" in self.bugs:
            return self._stale_lookup(parent_inode, name)
        return self._entry(self._node_named(parent_inode, name))

    def _node_named(self, parent_inode, name):
        """The node of name in parent (lookups and readdir), lookup count +1."""
        node = self._kept(parent_inode, name)
        if node is not None:
            node.lookups += 1
            return node
        node = self._node_at(self.nodes[parent_inode], name)
        if "renamed-lower" in self.bugs:
            if stat.S_ISDIR(node.stat.st_mode):  # one dentry per directory: d_splice_alias moves it here
                self.kept = {key: kept for key, kept in self.kept.items() if kept is not node}
            self.kept[(parent_inode, name)] = node
        return node

    def _kept(self, parent_inode, name):
        """renamed-lower: the node a name was found as, while its underlying object
        has a link (shiftfs_d_revalidate keeps a dentry while its lower dentry is
        hashed and positive; rename() moves a lower dentry, hashed, to the new name).
        A link count of 0 stands for an unhashed lower dentry: the two differ only
        for a file with other hard links whose name was unlinked."""
        node = self.kept.get((parent_inode, name))
        if node is None:
            return None
        if self.nodes.get(node.inode) is node:
            node.stat = os.fstat(node.fd)
            if node.stat.st_nlink:
                return node
        del self.kept[(parent_inode, name)]  # forgotten by the kernel, or unlinked: a lookup anew
        return None

    def _lower_name(self, parent_inode, name):
        """The underlying name an unlink or rename through the stack acts on: with
        renamed-lower, the name a kept node has in the directory now (shiftfs acts on
        the lower dentry, wherever rename() moved it; a name that is still one of its
        links stays).  The kernel drops or moves its dentry: the name is not kept."""
        node = self._kept(parent_inode, name)
        self.kept.pop((parent_inode, name), None)
        if node is None:
            return name
        with os.scandir(os.fsencode(self.nodes[parent_inode].proc)) as entries:
            links = [e.name for e in entries if e.inode() == node.keys[0][1]]
        return name if name in links or not links else links[0]

    def _stale_lookup(self, parent_inode, name):
        """stale-dentry: the first answer for a name, whatever the underlay did since."""
        if (parent_inode, name) in self.names:
            inode = self.names[(parent_inode, name)]
            if inode == 0:
                return self._negative_entry()
            node = self.nodes.get(inode)
            if node is not None:
                node.lookups += 1
                return self._entry(node)
        try:
            node = self._node_at(self.nodes[parent_inode], name)
        except FileNotFoundError:
            self.names[(parent_inode, name)] = 0
            return self._negative_entry()
        self.names[(parent_inode, name)] = node.inode
        return self._entry(node)

    def _negative_entry(self):
        """The stale-dentry bug caches that a name does not exist (inode 0)."""
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = 0
        attr.entry_timeout = self.entry_timeout
        return attr

    async def forget(self, inode_list):
        for inode, count in inode_list:
            node = self.nodes.get(inode)
            if node is None or inode == pyfuse3.ROOT_INODE:
                continue
            node.lookups -= count
            if node.lookups <= 0:
                os.close(node.fd)
                del self.nodes[inode]
                for key in node.keys:
                    self.by_key.pop(key, None)

    async def getattr(self, inode, ctx):
        node = self.nodes[inode]
        return self._entry(node, self._fresh_stat(node))

    async def setattr(self, inode, attr, fields, fh, ctx):
        node = self.nodes[inode]
        is_link = stat.S_ISLNK(node.stat.st_mode)
        if fields.update_uid or fields.update_gid:
            uid = self.ids.to_disk(attr.st_uid) if fields.update_uid else -1
            gid = self.ids.to_disk(attr.st_gid) if fields.update_gid else -1
            syscalls.fchownat_empty(node.fd, uid, gid)
        if fields.update_mode and not is_link:
            os.chmod(node.proc, stat.S_IMODE(attr.st_mode))
        if fields.update_size:
            os.truncate(fh if fh is not None else node.proc, attr.st_size)
        if (fields.update_atime or fields.update_mtime) and not is_link:
            now = os.fstat(node.fd)
            os.utime(node.proc, ns=(attr.st_atime_ns if fields.update_atime else now.st_atime_ns,
                                    attr.st_mtime_ns if fields.update_mtime else now.st_mtime_ns))
        node.stat = os.fstat(node.fd)
        return self._entry(node)

    async def readlink(self, inode, ctx):
        return os.readlink(b"", dir_fd=self.nodes[inode].fd)

    async def statfs(self, ctx):
        st = os.statvfs(self.nodes[pyfuse3.ROOT_INODE].proc)
        out = pyfuse3.StatvfsData()
        for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree",
                     "f_favail", "f_namemax"):
            setattr(out, name, getattr(st, name))
        return out

    # -- making and removing names -------------------------------------------------------
    def _owner_for_new(self, parent, ctx):
        """On-disk owner of a new object: the caller's ids, the parent's group if setgid."""
        uid = self.ids.to_disk(ctx.uid)
        parent_st = os.fstat(parent.fd)
        gid = parent_st.st_gid if parent_st.st_mode & stat.S_ISGID else self.ids.to_disk(ctx.gid)
        return uid, gid

    def _made(self, parent, name, uid, gid):
        os.chown(name, uid, gid, dir_fd=parent.fd, follow_symlinks=False)
        node = self._node_at(parent, name)
        return self._entry(node)

    async def mkdir(self, parent_inode, name, mode, ctx):
        parent = self.nodes[parent_inode]
        uid, gid = self._owner_for_new(parent, ctx)
        os.mkdir(name, mode & ~ctx.umask, dir_fd=parent.fd)
        return self._made(parent, name, uid, gid)

    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        parent = self.nodes[parent_inode]
        uid, gid = self._owner_for_new(parent, ctx)
        os.mknod(name, mode & ~ctx.umask, rdev, dir_fd=parent.fd)
        return self._made(parent, name, uid, gid)

    async def symlink(self, parent_inode, name, target, ctx):
        parent = self.nodes[parent_inode]
        uid, gid = self._owner_for_new(parent, ctx)
        os.symlink(target, name, dir_fd=parent.fd)
        return self._made(parent, name, uid, gid)

    async def create(self, parent_inode, name, mode, flags, ctx):
        parent = self.nodes[parent_inode]
        uid, gid = self._owner_for_new(parent, ctx)
        fd = os.open(name, flags | os.O_CREAT | os.O_CLOEXEC, mode & ~ctx.umask, dir_fd=parent.fd)
        return self._created_open(fd, uid, gid, lambda: self._node_at(parent, name))

    def _created_open(self, fd, uid, gid, find_node):
        """Finish create(): own the new file, know its node, hand the fd out as fh."""
        try:
            os.fchown(fd, uid, gid)
            node = find_node()
        except BaseException:
            os.close(fd)
            raise
        self.handles[fd] = node
        node.open_signature = self._signature(os.fstat(fd))
        return pyfuse3.FileInfo(fh=fd), self._entry(node)

    async def unlink(self, parent_inode, name, ctx):
        os.unlink(self._lower_name(parent_inode, name), dir_fd=self.nodes[parent_inode].fd)

    async def rmdir(self, parent_inode, name, ctx):
        os.rmdir(self._lower_name(parent_inode, name), dir_fd=self.nodes[parent_inode].fd)

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        syscalls.renameat2(self.nodes[parent_inode_old].fd, self._lower_name(parent_inode_old, name_old),
                           self.nodes[parent_inode_new].fd, self._lower_name(parent_inode_new, name_new), flags)

    async def link(self, inode, new_parent_inode, new_name, ctx):
        node, parent = self.nodes[inode], self.nodes[new_parent_inode]
        syscalls.linkat_empty(node.fd, parent.fd, new_name)
        return self._entry(self._node_at(parent, new_name))

    # -- files ----------------------------------------------------------------------
    @staticmethod
    def _signature(st):
        return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    async def open(self, inode, flags, ctx):
        node = self.nodes[inode]
        st = os.fstat(node.fd)
        if "estale-reopen" in self.bugs and st.st_nlink == 0:
            raise FUSEError(errno.ESTALE)
        # O_NOFOLLOW applied to the name the kernel already resolved; on our reopen
        # through the /proc/self/fd link it would fail every open with ELOOP (rsync).
        fd = os.open(node.proc, flags & ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_NOFOLLOW) | os.O_CLOEXEC)
        signature = self._signature(st)
        keep = node.open_signature == signature
        node.open_signature = signature
        self.handles[fd] = node
        return pyfuse3.FileInfo(fh=fd, keep_cache=keep)

    async def read(self, fh, off, size):
        return os.pread(fh, size, off)

    async def write(self, fh, off, buf):
        return os.pwrite(fh, buf, off)

    async def flush(self, fh):
        pass

    async def release(self, fh):
        self.handles.pop(fh, None)
        os.close(fh)

    async def fsync(self, fh, datasync):
        node = self.handles.get(fh)
        try:
            (os.fdatasync if datasync else os.fsync)(fh)
        except OSError as e:
            if "sync-swallow" in self.bugs:
                return
            if node is not None:
                node.sync_error = e.errno
            raise
        if "sync-repeat" in self.bugs and node is not None and node.sync_error:
            raise FUSEError(node.sync_error)

    # -- directories -------------------------------------------------------------------
    async def opendir(self, inode, ctx):
        fd = os.open(self.nodes[inode].proc, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.dirs[fd] = (inode, None)
        return fd

    async def readdir(self, fh, start_id, token):
        inode, names = self.dirs[fh]
        if names is None or start_id == 0:
            names = sorted(os.listdir(fh))
            self.dirs[fh] = (inode, names)
        await self._reply_entries(inode, names, start_id, token)

    async def _reply_entries(self, inode, names, start_id, token):
        for index in range(start_id, len(names)):
            name = os.fsencode(names[index])
            try:
                node = self._node_named(inode, name)
            except FileNotFoundError:  # gone since the listing
                continue
            if not pyfuse3.readdir_reply(token, name, self._entry(node), index + 1):
                node.lookups -= 1
                break

    async def releasedir(self, fh):
        self.dirs.pop(fh, None)
        os.close(fh)

    async def fsyncdir(self, fh, datasync):
        os.fsync(fh)

    # -- extended attributes ----------------------------------------------------------
    def _xattr_target(self, inode):
        node = self.nodes[inode]
        if stat.S_ISLNK(node.stat.st_mode):
            raise FUSEError(errno.EPERM)  # user xattrs are not allowed on symlinks anyway
        return node.proc

    async def getxattr(self, inode, name, ctx):
        try:
            value = os.getxattr(self._xattr_target(inode), name)
        except OSError as e:
            raise FUSEError(pyfuse3.ENOATTR if e.errno == errno.ENODATA else e.errno) from None
        return self.ids.acl_to_host(name, value)

    async def setxattr(self, inode, name, value, ctx):
        os.setxattr(self._xattr_target(inode), name, self.ids.acl_to_disk(name, value))

    async def listxattr(self, inode, ctx):
        return [os.fsencode(n) for n in os.listxattr(self._xattr_target(inode))]

    async def removexattr(self, inode, name, ctx):
        try:
            os.removexattr(self._xattr_target(inode), name)
        except OSError as e:
            raise FUSEError(pyfuse3.ENOATTR if e.errno == errno.ENODATA else e.errno) from None
