"""The step helpers: their messages, and no resource left behind by a failed expectation."""

import errno
import os

import pytest

from harness.steps import StepFailed, expect_errno


def test_an_unexpected_successful_open_leaves_no_fd(tmp_path):
    """An fd left open would keep a FUSE mount busy past its unmount: its daemon looks hung."""
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(StepFailed, match="create F: expected EOVERFLOW, got success"):
        expect_errno(errno.EOVERFLOW, "create F", os.open, str(tmp_path / "F"), os.O_CREAT | os.O_WRONLY, 0o644)
    assert set(os.listdir("/proc/self/fd")) == before


def test_the_wrong_errno_is_named(tmp_path):
    with pytest.raises(StepFailed, match=r"open F: expected EACCES, got ENOENT \(No such file or directory\)"):
        expect_errno(errno.EACCES, "open F", os.open, str(tmp_path / "F"), os.O_RDONLY)
