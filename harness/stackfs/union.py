"""stackfs' union mode: read-only lower directories under a writable upper one,
in overlayfs' on-disk format, so the same layers mount with kernel overlayfs.

Documentation/filesystems/overlayfs.rst is the model:
- the lower directories stack as overlayfs' lowerdir=a:b, the leftmost on top;
- a name in a higher layer hides the same name below; a whiteout (a 0/0
  character device) in a higher layer hides it and shows nothing;
- a directory marked opaque (xattr trusted.overlay.opaque = "y", or
  user.overlay.opaque with userxattr) hides everything below it;
- a name is looked up only in the layers its parent directory was merged
  from, so nothing of a lower layer shows below an opaque or upper-only
  directory, at any depth;
- a lower object is copied up before anything changes it (open for write,
  truncate, chmod, chown, utimes, setxattr, link), with its data, owner,
  mode, times and xattrs, parent directories first;
- renaming a lower directory fails with EXDEV, as overlayfs does without
  redirect_dir; an upper-only directory moved into a merged one is made opaque.
Nodes know their merged path; inode numbers stay the same across copy-up for
as long as the daemon runs.
"""

import errno
import os
import stat

import pyfuse3
from pyfuse3 import FUSEError

from harness.stackfs.passthrough import ShiftFS

WHITEOUT_RDEV = os.makedev(0, 0)


def _is_whiteout(st):
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == WHITEOUT_RDEV


def _lstat(path):
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


class UnionFS(ShiftFS):
    def __init__(self, lowers, upper, bugs=frozenset(), userxattr=False):
        self.upper = os.path.realpath(upper)
        self.lowers = [os.path.realpath(p) for p in lowers]
        self.layers = [self.upper] + self.lowers  # top first
        self.opaque_xattr = "user.overlay.opaque" if userxattr else "trusted.overlay.opaque"
        if "renamed-lower" in bugs:  # its unlink and rename name lower objects by path, not by kept node
            raise ValueError("the renamed-lower bug switch is for shift mode (shiftfs) only")
        super().__init__(upper, None, bugs)
        root = self.nodes[pyfuse3.ROOT_INODE]
        root.rel, root.layer = "", 0

    # -- the merged view -------------------------------------------------------------
    def _real(self, layer, rel):
        return os.path.join(self.layers[layer], rel) if rel else self.layers[layer]

    def _opaque(self, path):
        try:
            return os.getxattr(path, self.opaque_xattr) == b"y"
        except OSError:
            return False

    def _dir_layers(self, rel):
        """The layers whose directory rel is merged into the view, top first.
        As overlayfs, a name is looked up only in the layers its parent was merged
        from: below an opaque or upper-only directory no lower layer shows, at any depth."""
        if not rel:
            return list(range(len(self.layers)))
        found = []
        for layer in self._dir_layers(os.path.dirname(rel)):
            st = _lstat(self._real(layer, rel))
            if st is None:
                continue
            if _is_whiteout(st) or not stat.S_ISDIR(st.st_mode):
                break
            found.append(layer)
            if self._opaque(self._real(layer, rel)):
                break
        return found

    def _resolve(self, rel):
        """(layer, stat) of the object the view shows at rel, or None."""
        for layer in self._dir_layers(os.path.dirname(rel)):
            st = _lstat(self._real(layer, rel))
            if st is None:
                continue
            return None if _is_whiteout(st) else (layer, st)
        return None

    def _in_lower(self, rel):
        """Whether a lower layer shows something at rel (so removing it needs a whiteout)."""
        for layer in self._dir_layers(os.path.dirname(rel)):
            if layer == 0:
                continue
            st = _lstat(self._real(layer, rel))
            if st is not None:
                return not _is_whiteout(st)
        return False

    def _node(self, rel, layer):
        """Node of the object at rel in layer; lookup count +1."""
        node = self._adopt(os.open(self._real(layer, rel), os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC))
        node.rel, node.layer = rel, layer
        return node

    def _child(self, parent_inode, name):
        return os.path.join(self.nodes[parent_inode].rel, os.fsdecode(name))

    def _node_at(self, parent, name):  # used by readdir and lookups of the base class
        rel = os.path.join(parent.rel, os.fsdecode(name))
        found = self._resolve(rel)
        if found is None:
            raise FileNotFoundError(errno.ENOENT, "no such name in the union", rel)
        return self._node(rel, found[0])

    # -- copy-up -----------------------------------------------------------------------
    def _copy_meta(self, source, target, st):
        for name in os.listxattr(source, follow_symlinks=False):
            if not name.startswith(("trusted.overlay.", "user.overlay.")):
                os.setxattr(target, name, os.getxattr(source, name, follow_symlinks=False),
                            follow_symlinks=False)
        os.chown(target, st.st_uid, st.st_gid, follow_symlinks=False)
        if not stat.S_ISLNK(st.st_mode):
            os.chmod(target, stat.S_IMODE(st.st_mode))
            os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))

    def _upper_dir(self, rel):
        """Make sure directory rel exists in the upper layer (copying it up)."""
        if not rel:
            return self.upper
        target = self._real(0, rel)
        st = _lstat(target)
        if st is not None and stat.S_ISDIR(st.st_mode):
            return target
        self._upper_dir(os.path.dirname(rel))
        found = self._resolve(rel)
        if found is None or not stat.S_ISDIR(found[1].st_mode):
            raise FUSEError(errno.ENOENT)
        if st is not None:  # a whiteout in the way
            os.unlink(target)
        os.mkdir(target, 0o700)
        self._copy_meta(self._real(found[0], rel), target, found[1])
        return target

    def _copy_up(self, node):
        """Give node an upper copy; its inode number stays the same."""
        if node.layer == 0:
            return
        rel, source = node.rel, self._real(node.layer, node.rel)
        st = os.lstat(source)
        if stat.S_ISDIR(st.st_mode):
            self._upper_dir(rel)
        else:
            parent = self._upper_dir(os.path.dirname(rel))
            temp = os.path.join(parent, f".stackfs-copyup-{os.getpid()}-{node.inode}")
            if stat.S_ISREG(st.st_mode):
                with open(source, "rb") as src, open(temp, "xb") as dst:
                    while os.copy_file_range(src.fileno(), dst.fileno(), 1 << 30):
                        pass
            elif stat.S_ISLNK(st.st_mode):
                os.symlink(os.readlink(source), temp)
            else:
                os.mknod(temp, st.st_mode, st.st_rdev)
            self._copy_meta(source, temp, st)
            os.rename(temp, self._real(0, rel))  # replaces a whiteout, if any
        fd = os.open(self._real(0, rel), os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        os.close(node.fd)
        node.fd, node.layer = fd, 0
        node.stat = os.fstat(fd)
        node.keys.append((node.stat.st_dev, node.stat.st_ino))
        self.by_key[node.keys[-1]] = node.inode

    def _prepare_name(self, parent_inode, name):
        """Upper path for a new name: parent copied up, a whiteout there removed.
        Returns (path, covered): covered when the new object hides a lower one's remains."""
        rel = self._child(parent_inode, name)
        if self._resolve(rel) is not None:
            raise FUSEError(errno.EEXIST)
        path = os.path.join(self._upper_dir(os.path.dirname(rel)), os.fsdecode(name))
        covered = _lstat(path) is not None
        if covered:
            os.unlink(path)  # the whiteout
        return path, covered or self._in_lower(rel)

    def _whiteout(self, rel):
        os.mknod(os.path.join(self._upper_dir(os.path.dirname(rel)), os.path.basename(rel)),
                 stat.S_IFCHR | 0o000, WHITEOUT_RDEV)

    def _created(self, parent_inode, name):
        return self._entry(self._node(self._child(parent_inode, name), 0))

    # -- making names -----------------------------------------------------------------
    async def mkdir(self, parent_inode, name, mode, ctx):
        path, covered = self._prepare_name(parent_inode, name)
        os.mkdir(path, mode & ~ctx.umask)
        os.chown(path, ctx.uid, self._group_for_new(path, ctx))
        if covered:  # a new directory over a removed one must not show the old contents
            os.setxattr(path, self.opaque_xattr, b"y")
        return self._created(parent_inode, name)

    def _group_for_new(self, path, ctx):
        parent = os.stat(os.path.dirname(path))
        return parent.st_gid if parent.st_mode & stat.S_ISGID else ctx.gid

    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        path, _ = self._prepare_name(parent_inode, name)
        os.mknod(path, mode & ~ctx.umask, rdev)
        os.chown(path, ctx.uid, self._group_for_new(path, ctx), follow_symlinks=False)
        return self._created(parent_inode, name)

    async def symlink(self, parent_inode, name, target, ctx):
        path, _ = self._prepare_name(parent_inode, name)
        os.symlink(target, path)
        os.chown(path, ctx.uid, self._group_for_new(path, ctx), follow_symlinks=False)
        return self._created(parent_inode, name)

    async def create(self, parent_inode, name, mode, flags, ctx):
        path, _ = self._prepare_name(parent_inode, name)
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode & ~ctx.umask)
        return self._created_open(fd, ctx.uid, self._group_for_new(path, ctx),
                                  lambda: self._node(self._child(parent_inode, name), 0))

    async def link(self, inode, new_parent_inode, new_name, ctx):
        node = self.nodes[inode]
        self._copy_up(node)
        path, _ = self._prepare_name(new_parent_inode, new_name)
        os.link(self._real(0, node.rel), path, follow_symlinks=False)
        return self._entry(self._node(self._child(new_parent_inode, new_name), 0))

    # -- removing and renaming -----------------------------------------------------------
    def _merged_names(self, rel):
        names, hidden = set(), set()
        for layer in self._dir_layers(rel):
            for entry in os.scandir(self._real(layer, rel)):
                if entry.name in names or entry.name in hidden:
                    continue
                if _is_whiteout(entry.stat(follow_symlinks=False)):
                    hidden.add(entry.name)
                else:
                    names.add(entry.name)
        return sorted(names)

    async def unlink(self, parent_inode, name, ctx):
        rel = self._child(parent_inode, name)
        found = self._resolve(rel)
        if found is None:
            raise FUSEError(errno.ENOENT)
        if stat.S_ISDIR(found[1].st_mode):
            raise FUSEError(errno.EISDIR)
        in_lower = self._in_lower(rel)
        if found[0] == 0:
            os.unlink(self._real(0, rel))
        if in_lower:
            self._whiteout(rel)

    async def rmdir(self, parent_inode, name, ctx):
        rel = self._child(parent_inode, name)
        found = self._resolve(rel)
        if found is None:
            raise FUSEError(errno.ENOENT)
        if not stat.S_ISDIR(found[1].st_mode):
            raise FUSEError(errno.ENOTDIR)
        if self._merged_names(rel):
            raise FUSEError(errno.ENOTEMPTY)
        in_lower = self._in_lower(rel)
        upper = self._real(0, rel)
        if _lstat(upper) is not None:
            for entry in os.scandir(upper):  # only whiteouts are left in it
                os.unlink(entry.path)
            os.rmdir(upper)
        if in_lower:
            self._whiteout(rel)

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        if flags:
            raise FUSEError(errno.EINVAL)  # RENAME_EXCHANGE/NOREPLACE: not in this model
        old, new = self._child(parent_inode_old, name_old), self._child(parent_inode_new, name_new)
        found, target = self._resolve(old), self._resolve(new)
        if found is None:
            raise FUSEError(errno.ENOENT)
        is_dir = stat.S_ISDIR(found[1].st_mode)
        target_is_dir = target is not None and stat.S_ISDIR(target[1].st_mode)
        if target is not None and target_is_dir != is_dir:
            raise FUSEError(errno.ENOTDIR if is_dir else errno.EISDIR)
        if is_dir and any(layer > 0 for layer in self._dir_layers(old)):
            raise FUSEError(errno.EXDEV)  # a merged or lower directory: overlayfs without redirect_dir
        # A target directory with lower layers must look empty (checked after EXDEV, as
        # overlayfs does); an upper-only one is left to the upper filesystem's rename.
        target_merged = target_is_dir and any(layer > 0 for layer in self._dir_layers(new))
        if target_merged and self._merged_names(new):
            raise FUSEError(errno.ENOTEMPTY)
        node = self._node(old, found[0])
        try:
            self._copy_up(node)
            old_in_lower = self._in_lower(old)
            dest = os.path.join(self._upper_dir(os.path.dirname(new)), os.fsdecode(name_new))
            if is_dir and any(layer > 0 for layer in self._dir_layers(os.path.dirname(new))):
                # A directory moved into a merged one must not show what the lower layers
                # have under its new name.  Marked before the move, as overlayfs does: a
                # move the upper filesystem refuses (ENOTEMPTY) leaves the mark.
                os.setxattr(self._real(0, old), self.opaque_xattr, b"y")
            in_the_way = _lstat(dest)
            if is_dir and in_the_way is not None:
                if target_merged:  # empty in the view: whiteouts only
                    for entry in os.scandir(dest):
                        os.unlink(entry.path)
                    os.rmdir(dest)
                elif not stat.S_ISDIR(in_the_way.st_mode):
                    os.unlink(dest)  # a whiteout where the directory goes
            os.rename(self._real(0, old), dest)
            if old_in_lower:
                self._whiteout(old)
            for other in self.nodes.values():  # nodes under the old name move with it
                if getattr(other, "rel", None) is not None and (other.rel == old or other.rel.startswith(old + "/")):
                    other.rel = new + other.rel[len(old):]
        finally:
            node.lookups -= 1

    # -- changing objects: copy up first ----------------------------------------------------
    async def setattr(self, inode, attr, fields, fh, ctx):
        self._copy_up(self.nodes[inode])
        return await super().setattr(inode, attr, fields, fh, ctx)

    async def setxattr(self, inode, name, value, ctx):
        self._copy_up(self.nodes[inode])
        return await super().setxattr(inode, name, value, ctx)

    async def removexattr(self, inode, name, ctx):
        if self.nodes[inode].layer != 0:
            # as overlayfs: an xattr the lower object lacks is ENODATA, with no copy-up
            await self.getxattr(inode, name, ctx)
        self._copy_up(self.nodes[inode])
        return await super().removexattr(inode, name, ctx)

    async def getxattr(self, inode, name, ctx):
        if os.fsdecode(name).startswith(("trusted.overlay.", "user.overlay.")):
            raise FUSEError(pyfuse3.ENOATTR)  # overlayfs keeps its own xattrs out of view
        return await super().getxattr(inode, name, ctx)

    async def listxattr(self, inode, ctx):
        names = await super().listxattr(inode, ctx)
        return [n for n in names if not n.startswith((b"trusted.overlay.", b"user.overlay."))]

    async def open(self, inode, flags, ctx):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC):
            self._copy_up(self.nodes[inode])
        return await super().open(inode, flags, ctx)

    # -- directories -------------------------------------------------------------------
    async def readdir(self, fh, start_id, token):
        inode, names = self.dirs[fh]
        if names is None or start_id == 0:
            names = self._merged_names(self.nodes[inode].rel)
            self.dirs[fh] = (inode, names)
        await self._reply_entries(inode, names, start_id, token)

