"""The probe and needs-as-data: what they report, and the reasons they give."""

import os

import pytest

from harness import probe as probe_mod
from harness.needs import Bug, Needs
from conftest import fake_probe
from harness.probe import Probe, kernel_version


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    return probe_mod.run_probe(str(tmp_path_factory.mktemp("probe")))


@pytest.mark.parametrize("release, version", [
    ("6.18.44-fc-v669", (6, 18, 44)), ("5.15.0-91-generic", (5, 15, 0)), ("6.1", (6, 1, 0)),
    ("6.12.9+bpo-amd64", (6, 12, 9)), ("4.19.0-rc3", (4, 19, 0))])
def test_kernel_version(release, version):
    assert kernel_version(release) == version


def opens(path):
    try:
        os.close(os.open(path, os.O_RDWR))
        return True
    except OSError:
        return False


def test_probe_matches_the_machine(probe):
    with open("/proc/filesystems") as f:
        listed = {line.split()[-1] for line in f if line.strip()}
    assert probe.kernel == os.uname().release
    assert set(probe.filesystems) == listed
    assert probe.feature("root")
    assert probe.feature("shiftfs") == ("shiftfs" in listed)
    assert probe.feature("fuse") == os.path.exists("/dev/fuse")
    assert probe.feature("device-mapper") == opens("/dev/mapper/control")
    if not probe.feature("device-mapper"):  # e.g. the node exists but answers ENODEV
        assert probe.reason("device-mapper").startswith("no device-mapper: /dev/mapper/control: E")
    if "overlay" in listed:
        assert probe.feature("overlay@tmpfs"), probe.reason("overlay@tmpfs")


def test_absent_features_say_why(probe):
    for name, entry in probe.features.items():
        if not entry["ok"]:
            assert entry["detail"], f"{name} is absent without a reason"
    if not probe.feature("shiftfs"):
        assert probe.reason("shiftfs") == "kernel has no shiftfs (an Ubuntu-only filesystem)"


def test_probe_leaves_nothing_mounted(probe, tmp_path):
    with open("/proc/self/mountinfo") as f:
        assert "probe-overlay" not in f.read()


def test_json_round_trip_and_table(probe):
    again = Probe.from_json(probe.to_json())
    assert again == probe
    table = probe.table()
    assert table.splitlines()[0] == f"kernel        {probe.kernel}"
    assert "per underlay" in table and "tools" in table


def test_needs_give_exact_reasons():
    p = fake_probe(**{"overlay.volatile@ext4": False, "userns": True})
    assert Needs(min_kernel="6.2").unmet(p, "ext4") == "kernel 6.1.0-test is older than 6.2"
    assert Needs(min_kernel="6.1").unmet(p, "ext4") is None
    assert Needs(features=("overlay.volatile@{fs}",)).unmet(p, "ext4") == "overlay.volatile@ext4 is missing here"
    assert Needs(features=("userns",)).unmet(p, "ext4") is None
    assert Needs(features=("idmapped@{fs}",)).unmet(p, "tmpfs") == "idmapped@tmpfs: not probed on this run"
    assert Needs(commands=("emacs",)).unmet(p, "ext4") == "emacs not found on PATH"


def test_applicability_is_not_a_machine_need():
    shift_only = Needs(stack_traits=("shift",), filesystems=("ext4",))
    assert shift_only.applies_to({"shift"}, "ext4")
    assert not shift_only.applies_to({"union"}, "ext4")
    assert not shift_only.applies_to({"shift"}, "xfs")


def test_bug_description_names_its_references():
    bug = Bug("stale dentries", lp=1879196, commit="abc123def456")
    assert bug.describe() == "stale dentries (LP#1879196, linux-git abc123def456)"
