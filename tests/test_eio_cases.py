"""Each eio case goes red when the fault never reaches the stack, and green when it does.

The cases run here in-process on a real stack over the bundled faulty device;
the "defanged" runs swap the device's fail() for one that fails nothing (so a
correct stack reports no error, which the rules forbid) or its heal() for one
that silently drops the file's later writes (so fsync says 0 for data that never
reaches the disk, which step S5.5 forbids).
"""

import importlib.util
import re
import os

import pytest

from conftest import NO_TRACES, ROOT, harness_traces
from harness import probe as probing, scratch, stacks
from harness.faults.fusedev import FuseDev
from harness.steps import StepFailed

spec = importlib.util.spec_from_file_location("eio_cases", os.path.join(ROOT, "cases", "test_eio.py"))
eio = importlib.util.module_from_spec(spec)
spec.loader.exec_module(eio)

NO_ERROR = "expected EIO, got success"
CASES = {  # case id: (function, a stack it passes on here, what the never-failing device makes it say)
    "stack/040": (eio.test_fsync_error_once_per_fd, "idmapped", NO_ERROR),
    "stack/041": (eio.test_injector_fails_only_chosen_sectors, "overlay",
                  "O_DIRECT reads fail (EIO) for exactly the chosen sectors"),
    "stack/042": (eio.test_syncfs_error_once_per_process, "idmapped", NO_ERROR),
    "stack/043": (eio.test_volatile_overlay_error_sticks, "overlay_volatile", NO_ERROR),
}


@pytest.fixture(scope="module")
def machine(tmp_path_factory):
    return probing.run_probe(str(tmp_path_factory.mktemp("probe")), filesystems=("ext4",))


def run_case(run_base, machine, case_id, fstype="ext4"):
    fn, variant, _ = CASES[case_id]
    why = stacks.unavailable(variant, fstype, machine)
    if why:
        pytest.skip(why)
    pool = scratch.ScratchPool(os.path.join(run_base, "pool"))
    try:
        with pool.underlay(fstype, fault_backend=FuseDev) as under:
            stack = stacks.stack_class(variant)(variant, under, os.path.join(run_base, "stack"))
            stack.mount()
            try:
                fn(stack)
            finally:
                stack.unmount()
    finally:
        pool.close()
    assert harness_traces(run_base) == NO_TRACES


@pytest.mark.parametrize("case_id", sorted(CASES))
def test_green_with_the_real_fault(run_base, machine, case_id):
    run_case(run_base, machine, case_id)


@pytest.mark.parametrize("case_id", sorted(CASES))
def test_red_when_the_device_never_fails(run_base, machine, monkeypatch, case_id):
    monkeypatch.setattr(FuseDev, "fail", lambda self, ranges: None)
    with pytest.raises(StepFailed, match=re.escape(CASES[case_id][2])):
        run_case(run_base, machine, case_id)


def test_data_check_red_when_healed_writes_vanish(run_base, machine, monkeypatch):
    """S5.5: after healing, the file's writes are dropped by the device while fsync says 0."""
    failed = []
    monkeypatch.setattr(FuseDev, "fail", lambda self, ranges: (failed.extend(ranges), self._control(
        "".join(f"fail {start} {length}\n" for start, length in ranges))))
    monkeypatch.setattr(FuseDev, "heal", lambda self: (self._control("heal\n"), self.drop_writes(failed)))
    with pytest.raises(StepFailed, match="S5.5 the device holds what fsync returned 0 for"):
        run_case(run_base, machine, "stack/040")
