"""The client drivers run the real programs, which save the way each style says:
the new content in F, the old one in the backup they name, F's own inode kept
by the in-place styles and a new inode from the others, and no process, lock or
temporary file left.
The scratch is under the temporary directory on purpose: Emacs and Vim skip
backups there by default, and the drivers must make them save as they would a
person's file."""

import os

import pytest

from harness import clients

OLD = b"the old version\n"
NEW = b"the new version / & \\ saved\n"
STYLES = [(name, style) for name, cls in sorted(clients.clients().items()) for style in cls.styles]


def _workspace(tmp_path, name):
    """The client, a session with its own HOME, and an empty directory for F."""
    client = clients.client(name)
    if client.unavailable():
        pytest.skip(client.unavailable())
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    return client, clients.Session(str(home)), work


@pytest.mark.parametrize("name,style", STYLES, ids=[f"{n}-{s}" for n, s in STYLES])
def test_a_client_saves_as_its_style_says(tmp_path, name, style):
    client, session, work = _workspace(tmp_path, name)
    path = str(work / "F")
    client.prepare(path, OLD, NEW, session)
    kept = os.open(path, os.O_RDONLY)  # pins the old inode: its number cannot be reused
    try:
        inode = os.fstat(kept).st_ino
        backup = client.save_and_check(path, NEW, style, session)
        with open(path, "rb") as f:
            assert f.read() == NEW
        assert (os.stat(path).st_ino == inode) == (style in client.in_place), \
            f"{name} ({style}) {'rewrote' if os.stat(path).st_ino == inode else 'replaced'} F"
        if backup is not None:
            with open(work / backup, "rb") as f:
                assert f.read() == OLD
    finally:
        os.close(kept)
    assert clients.leftover_processes() == []
    # no lock, auto-save or temporary file left beside F (a repository's metadata is expected)
    assert set(os.listdir(work)) - {".git", ".bzr"} == {"F"} | ({backup} if backup else set())


@pytest.mark.parametrize("name,style", STYLES, ids=[f"{n}-{s}" for n, s in STYLES])
def test_the_steps_a_reproduction_runs_save_as_the_style_does(tmp_path, name, style):
    """Reproductions run save_steps(): for a terminal style, the same save without
    a terminal.  It must keep or replace F's inode exactly as the style does."""
    client, session, work = _workspace(tmp_path, name)
    client.do(client.prepare_steps("F", OLD, NEW), str(work), session)
    kept = os.open(work / "F", os.O_RDONLY)
    try:
        inode = os.fstat(kept).st_ino
        client.do(client.save_steps("F", NEW, style), str(work), session)
        assert (work / "F").read_bytes() == NEW
        assert (os.stat(work / "F").st_ino == inode) == (style in client.in_place)
    finally:
        os.close(kept)
