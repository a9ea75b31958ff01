"""The run directory's owner record: a live run is never taken for a dead one, and a
dead run's directory is recovered by the next (harness/rundir.py)."""

import json
import os

import pytest

from harness import rundir

from conftest import harness_traces, NO_TRACES


def ticks_after_boot(pid):
    """Field 22 of /proc/<pid>/stat (proc(5)): the start time in clock ticks after boot."""
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[19])


@pytest.fixture
def run(run_base):
    made = rundir.RunDir.create(run_base)
    yield made
    made.remove()
    assert harness_traces(run_base) == NO_TRACES


def owner(run):
    with open(os.path.join(run.path, "owner")) as f:
        return json.load(f)


def test_the_owner_record_names_this_process_and_its_start_in_ticks(run):
    assert os.path.basename(run.path).startswith(f"run-{os.getpid()}-")
    assert owner(run) == {"pid": os.getpid(), "start": ticks_after_boot(os.getpid())}
    assert run.owner_alive()


def test_a_live_run_is_left_alone_by_a_recovery_beside_it(run, run_base):
    run.sub("stack")
    assert rundir.recover_leftovers(run_base) == []
    assert os.path.isdir(run.sub("stack")) and run.owner_alive()


def test_a_recycled_pid_is_not_the_owner(run, run_base):
    """The same pid with another start time is another process: the owner is dead,
    whatever the wall clock says."""
    record = owner(run)
    with open(os.path.join(run.path, "owner"), "w") as f:
        json.dump({"pid": record["pid"], "start": record["start"] - 1}, f)
    assert not run.owner_alive()
    assert rundir.recover_leftovers(run_base) == []  # its own bind is no leftover worth a line
    assert not os.path.exists(run.path)


def test_a_run_being_born_is_never_recovered(run_base):
    """A directory still being made (no owner record yet) carries its maker's pid in its
    name: while that process lives, a recovery beside it leaves it alone."""
    staging = os.path.join(run_base, f"{rundir.STAGING}{os.getpid()}-abcd")
    os.mkdir(staging)
    assert rundir.recover_leftovers(run_base) == [] and os.path.isdir(staging)
    dead = os.path.join(run_base, f"{rundir.STAGING}{2 ** 22 + 1}-abcd")  # above pid_max: nobody's
    os.mkdir(dead)
    rundir.recover_leftovers(run_base)
    assert os.path.isdir(staging) and not os.path.exists(dead)


def test_a_run_directory_appears_only_with_its_owner_record(run_base, monkeypatch):
    """The run-* name is given by one rename, once the owner record is written."""
    seen = []
    rename = os.rename

    def watching(source, target):
        seen.append((os.path.basename(target), sorted(os.listdir(source))))
        rename(source, target)

    monkeypatch.setattr(rundir.os, "rename", watching)
    made = rundir.RunDir.create(run_base)
    try:
        assert seen == [(os.path.basename(made.path), ["owner"])]
        assert [n for n in os.listdir(run_base) if n.startswith("run-")] == [os.path.basename(made.path)]
    finally:
        made.remove()
