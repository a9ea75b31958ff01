"""S2: fstat of an unlinked device node, FIFO or socket (LP#1860041).

Device files are pinned through the device layer, not like regular files;
after unlink, fstat of an fd that the stack handed out failed.  Correct:
fstat(fd) and stat("/proc/self/fd/N") both succeed with the right file type,
st_rdev and nlink 0; the char device still behaves as /dev/null; the FIFO
still carries bytes from writer to reader.
"""

import os
import socket
import stat

from fixtures import Bug, Repro, case, check, step

LP1860041 = Bug("shiftfs: fstat of an unlinked device node fails",
                lp=1860041, link="https://bugs.launchpad.net/bugs/1860041")
GROUPS = ("auto", "quick", "devnode")
DEV_NULL = os.makedev(1, 3)
LOOP0 = os.makedev(7, 0)


def _make_nodes(stack, kinds):
    """Create the nodes as host root: on the underlay where the stack's user is a
    container (a user namespace forbids mknod), else through the stack."""
    where = stack.host_path if stack.user_map else stack.path
    for name, kind in kinds.items():
        path = where(name)
        with step(f"S2 make {kind} {name} as host root {'on the underlay' if stack.user_map else 'through the stack'}"):
            if kind == "chardev":
                os.mknod(path, 0o666 | stat.S_IFCHR, DEV_NULL)
            elif kind == "blockdev":
                os.mknod(path, 0o600 | stat.S_IFBLK, LOOP0)
            elif kind == "fifo":
                os.mkfifo(path, 0o666)
            else:
                with socket.socket(socket.AF_UNIX) as sock:
                    sock.bind(path)
            # The container's root must be able to unlink them (on-disk 0 = container 0).
            os.chmod(path, 0o666 if kind != "blockdev" else 0o600)


def _open_unlink_stat(root, name, flags, expect_type, expect_rdev):
    path = os.path.join(root, name)
    with step(f"S2 open {name} through the stack"):
        fd = os.open(path, flags)
    with step(f"S2 unlink {name}, keeping the fd"):
        os.unlink(path)
    for how, call in (("fstat(fd)", lambda: os.fstat(fd)),
                      (f"stat(/proc/self/fd/{fd})", lambda: os.stat(f"/proc/self/fd/{fd}"))):
        with step(f"S2 {how} of the unlinked {name}"):
            st = call()
        check(stat.S_IFMT(st.st_mode) == expect_type, f"S2 {how} of {name} gives the right file type",
              f"got mode {st.st_mode:o}")
        if expect_rdev is not None:
            check(st.st_rdev == expect_rdev, f"S2 {how} of {name} gives st_rdev "
                  f"{os.major(expect_rdev)}:{os.minor(expect_rdev)}",
                  f"got {os.major(st.st_rdev)}:{os.minor(st.st_rdev)}")
        check(st.st_nlink == 0, f"S2 {how} of {name} gives nlink 0", f"got {st.st_nlink}")
    return fd


MAKE_NODE = {  # as host root: on the underlay for a container (a user namespace may not mknod)
    "null": 'os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))',
    "fifo": "os.mkfifo(path, 0o666)",
    "sock": "socket.socket(socket.AF_UNIX).bind(path)",
    "loop": "os.mknod(path, 0o600 | stat.S_IFBLK, os.makedev(7, 0))",
}


def _repro(*nodes):
    """S2 outside stackcheck: each node opened, unlinked, then fstat through its fd."""
    lines = ["def fstat_unlinked(name, flags):",
             "    fd = os.open(os.path.join(MNT, name), flags)",
             "    os.unlink(os.path.join(MNT, name))",
             "    yield attempt(lambda: (stat.filemode(os.fstat(fd).st_mode)[0], os.fstat(fd).st_nlink))",
             ""]
    for name, flags, kind in nodes:
        lines += [f"path = os.path.join(HOST if SHIFT else MNT, {name!r})",
                  MAKE_NODE[name], "os.chmod(path, 0o666)",
                  f"user = in_container(fstat_unlinked, {name!r}, {flags})",
                  f"show('fstat(fd) of the unlinked {name}: (type, nlink)', user.next(), ({kind!r}, 0))",
                  "user.close()"]
    return Repro("fstat(fd) of an open device node, FIFO or socket works after it is unlinked, "
                 "giving its type and nlink 0 (LP#1860041)", "\n".join(lines))


def _char_device(root):
    fd = _open_unlink_stat(root, "null", os.O_RDWR, stat.S_IFCHR, DEV_NULL)
    with step("S2 write to the unlinked char device"):
        written = os.write(fd, b"into the void")
    check(written == 13, "S2 the char device takes writes as /dev/null does", f"wrote {written}")
    with step("S2 read from the unlinked char device"):
        data = os.read(fd, 64)
    check(data == b"", "S2 the char device reads EOF as /dev/null does", f"read {data!r}")


@case("stack/005", "fstat an unlinked character device (1:3) through the stack; it still works as /dev/null",
      GROUPS, bug=LP1860041, repro=_repro(("null", "os.O_RDWR", "c")))
def test_unlinked_char_device(stack):
    _make_nodes(stack, {"null": "chardev"})
    stack.run(_char_device, stack.path())


def _fifo(root):
    fd = _open_unlink_stat(root, "fifo", os.O_RDWR | os.O_NONBLOCK, stat.S_IFIFO, None)
    with step("S2 write into the unlinked FIFO"):
        os.write(fd, b"through the pipe")
    with step("S2 read from the unlinked FIFO"):
        data = os.read(fd, 64)
    check(data == b"through the pipe", "S2 the FIFO carries bytes from writer to reader", f"read {data!r}")


@case("stack/006", "fstat an unlinked FIFO through the stack; it still carries data",
      GROUPS, bug=LP1860041, repro=_repro(("fifo", "os.O_RDWR | os.O_NONBLOCK", "p")))
def test_unlinked_fifo(stack):
    _make_nodes(stack, {"fifo": "fifo"})
    stack.run(_fifo, stack.path())


def _socket_and_block_device(root):
    _open_unlink_stat(root, "sock", os.O_PATH, stat.S_IFSOCK, None)
    _open_unlink_stat(root, "loop", os.O_PATH, stat.S_IFBLK, LOOP0)


@case("stack/007", "fstat an unlinked unix socket and block device (O_PATH fds) through the stack",
      GROUPS, bug=LP1860041, repro=_repro(("sock", "os.O_PATH", "s"), ("loop", "os.O_PATH", "b")))
def test_unlinked_socket_and_block_device(stack):
    _make_nodes(stack, {"sock": "socket", "loop": "blockdev"})
    stack.run(_socket_and_block_device, stack.path())
