"""The stack user's processes: container ids, the channel, failures carried back."""

import errno
import os

import psutil
import pytest

from harness import container


def whoami():
    return os.getuid(), os.getgid(), open("/proc/self/uid_map").read().split()


def test_container_root_is_host_100000(run_base):
    uid, gid, uid_map = container.run(whoami, idmap=container.CONTAINER_MAP)
    assert (uid, gid) == (0, 0)
    assert uid_map == ["0", "100000", "65536"]
    os.chmod(run_base, 0o777)
    target = os.path.join(run_base, "made-in-container")
    container.run(lambda: open(target, "w").close(), idmap=container.CONTAINER_MAP)
    st = os.stat(target)
    assert (st.st_uid, st.st_gid) == (100000, 100000)


def test_host_child_keeps_host_ids():
    uid, _, uid_map = container.run(whoami)
    assert uid == 0 and uid_map == ["0", "0", "4294967295"]


def test_errors_come_back_with_errno_and_traceback():
    def fail():
        raise OSError(errno.ESTALE, "Stale file handle")
    with pytest.raises(OSError) as info:
        container.run(fail, idmap=container.CONTAINER_MAP)
    assert info.value.errno == errno.ESTALE
    assert "in the stack user's process" in info.value.__notes__[0]


def conversation(channel, start):
    channel.send(start + 1)
    return channel.recv() * 2


def test_channel_and_joining_a_container():
    first = container.start(conversation, 1, idmap=container.CONTAINER_MAP)
    try:
        assert first.recv() == 2
        with open(f"/proc/{first.pid}/ns/user") as a:
            inode = os.fstat(a.fileno()).st_ino
        joined = container.run(lambda: os.stat("/proc/self/ns/user").st_ino, join=first.pid)
        assert joined == inode
        first.send(21)
        assert first.result() == 42
    finally:
        first.close()


def test_a_dead_child_is_reported_not_waited_for():
    child = container.start(lambda channel: os._exit(3))
    with pytest.raises(container.ChildFailed, match="died without a result"):
        child.result()


def test_no_child_outlives_its_parent():
    """A child blocked forever dies when the process that started it dies."""
    code = ("import os, sys; from harness import container; "
            "c = container.start(lambda ch: (ch.send(os.getpid()), os.read(os.pipe()[0], 1)), "
            "idmap=container.CONTAINER_MAP); print(c.recv(), flush=True); sys.stdin.read()")
    import subprocess
    parent = subprocess.Popen([os.sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=dict(os.environ, PYTHONPATH=os.getcwd()))
    child_pid = int(parent.stdout.readline())
    assert psutil.pid_exists(child_pid)
    parent.kill()
    parent.wait()
    proc = psutil.Process(child_pid) if psutil.pid_exists(child_pid) else None
    if proc is not None:  # the kernel delivers PDEATHSIG as the parent exits
        proc.wait(timeout=10)
