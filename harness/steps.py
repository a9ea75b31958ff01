"""Scenario steps with failure messages that name the step and the errno.

    with step("S1.2 reopen /proc/self/fd/A O_RDWR"):
        fd = os.open(...)
    expect_errno(errno.ENOENT, "S1.5 create under the removed directory", os.open, path, flags)

A failure reads "S1.2 reopen /proc/self/fd/A O_RDWR: expected success, got
ESTALE (Stale file handle)"; every step is also logged, so a case's .full is
the scenario as it ran.
"""

import contextlib
import errno
import os
import sys


class StepFailed(AssertionError):
    """The stack misbehaved at a named step."""


class KnownGap(StepFailed):
    """The stack broke a rule that no kernel release is known to keep yet: the
    expectation stands, but the failure is reported as a known gap (with `gap`,
    why), not as a regression, unless the run is strict."""

    def __init__(self, message, gap=""):
        super().__init__(message)
        self.gap = gap


def errname(number):
    return errno.errorcode.get(number, f"errno {number}")


def log(message):
    print(f"[{os.getpid()}] {message}", file=sys.stdout, flush=True)


@contextlib.contextmanager
def step(description):
    log(description)
    try:
        yield
    except OSError as e:
        raise StepFailed(f"{description}: expected success, got {errname(e.errno)} ({e.strerror})") from None


def expect_errno(expected, description, fn, *args, **kwargs):
    """Call fn(*args, **kwargs) and require that it fails with errno `expected`."""
    log(f"{description} (expect {errname(expected)})")
    try:
        result = fn(*args, **kwargs)
    except OSError as e:
        if e.errno != expected:
            raise StepFailed(f"{description}: expected {errname(expected)}, "
                             f"got {errname(e.errno)} ({e.strerror})") from None
        return
    if fn is os.open:  # an fd left open would keep a FUSE mount busy past its unmount
        os.close(result)
    raise StepFailed(f"{description}: expected {errname(expected)}, got success")


def check(condition, description, observed=""):
    """Require condition; the message says what the step expected and what it saw."""
    if not condition:
        raise StepFailed(f"{description}" + (f": {observed}" if observed else ""))
    log(f"ok: {description}")
