"""What fsync and syncfs must return after a writeback error: data by kernel release and stack.

The eio cases never hold a kernel's behaviour in their bodies; they ask
expect(rule, variant) and log the answer, so a case's .full says which rule it
held the kernel to and why.  Each promise names the first release that keeps it
(from the commit that brought it); a release before that gets the documented
older behaviour; a promise no release is known to keep (since=None) is still
the expectation, and a failure then raises KnownGap, reported as a known gap.  A release newer than any
listed one is held to the newest rules, which is upstream's current state.
"""

import errno
import os
from dataclasses import dataclass

from harness.probe import kernel_version
from harness.steps import KnownGap, StepFailed, expect_errno, log, step


@dataclass(frozen=True)
class Promise:
    rule: str             # "fsync", "syncfs", "volatile"
    stacks: str           # glob over stack variants, or a kind (stacks.matches); the first match wins
    since: tuple | None   # first release keeping it; None: no release is known to
    says: str
    source: str
    before: str = ""      # what releases before `since` do instead
    gap: str = ""         # with since=None: why no release keeps it yet


THREAD = "linux-unionfs, Nov 2020, 'overlayfs volatile mounts and syncfs' (https://lore.kernel.org/linux-unionfs/)"

PROMISES = (
    Promise("fsync", "*", (4, 13, 0),
            "fsync(fd) reports a writeback error of the file once to each fd open before it was seen",
            "commit 5660e13d2fd6 (errseq_t), Documentation/filesystems/vfs.rst 'Handling errors during writeback'",
            "fsync reported an error to whichever caller came first"),
    Promise("syncfs", "overlay*", None,
            "syncfs through an overlay reports the upper filesystem's writeback error once to each overlay fd",
            f"the goal of {THREAD}",
            gap="ovl_sync_fs syncs the upper filesystem but never checks its writeback errseq, so the "
                "overlay's own superblock records no error"),
    Promise("syncfs", "fuse", None,
            "syncfs through a FUSE stack reports the backing filesystem's writeback error once to each fd",
            f"what {THREAD} asks of every stack",
            gap="the kernel sends syncfs to a FUSE server only for virtiofs (FUSE_SYNCFS, 5.15: fc->sync_fs), "
                "so a FUSE stack never sees it"),
    Promise("syncfs", "shiftfs", None,
            "syncfs through shiftfs reports the underlying filesystem's writeback error once to each fd",
            f"what {THREAD} asks of every stack",
            gap="shiftfs has no sync_fs (shiftfs_super_ops): syncfs through it neither writes the underlying "
                "filesystem back nor reads its writeback errseq, so its own superblock records no error"),
    Promise("syncfs", "*", (5, 8, 0),
            "syncfs(fd) reports the filesystem's writeback error once to each fd",
            "commit 735e4ae5ba28 (vfs: track per-sb writeback errors and report them to syncfs)",
            "syncfs returned 0 whatever writeback had failed"),
    Promise("volatile", "overlay_volatile", (5, 11, 0),
            "once the upper filesystem records a writeback error after the mount, fsync, fdatasync and "
            "syncfs on the volatile overlay return it every time until the overlay is mounted again, and "
            "mounting over the dirty workdir fails until work/incompat/volatile is removed",
            "commit 335d3fc57941 (ovl: implement volatile-specific fsync error behaviour), "
            "Documentation/filesystems/overlayfs.rst 'Volatile mount'",
            "no volatile mount option"),
)


@dataclass(frozen=True)
class Expectation:
    reports: bool        # must the call return the error?
    why: str
    gap: str = ""        # no release is known to keep the promise: named in a failure

    def describe(self):
        return ("report the error" if self.reports else "return 0") + f": {self.why}"


def promise(rule, variant):
    from harness import stacks  # late: the stacks' modules import the harness's steps
    for p in PROMISES:
        if p.rule == rule and stacks.matches(p.stacks, variant):
            return p
    raise KeyError(f"no promise for {rule} on {variant}")


def expect(rule, variant, release=None):
    """What `rule` says for this stack variant on this kernel release (the running one by default)."""
    release = release or os.uname().release
    p = promise(rule, variant)
    if p.since is None:
        return Expectation(True, f"{p.says} ({p.source})",
                           gap=f"known gap, no kernel release is known to keep this yet: {p.gap}")
    if kernel_version(release) < p.since:
        since = ".".join(map(str, p.since[:2]))
        return Expectation(False, f"kernel {release} predates {since}, where {p.source} came in: {p.before}")
    return Expectation(True, f"{p.says} ({p.source})")


def log_expectations(variant, rules):
    for rule in rules:
        log(f"rule {rule} on {variant}, kernel {os.uname().release}: {expect(rule, variant).describe()}")


def gaps(variant, rules, release=None):
    """The known gaps among these rules for this stack variant and kernel release."""
    return [e.gap for e in (expect(rule, variant, release) for rule in rules) if e.gap]


def sync_call(expectation, description, fn, fd, error=errno.EIO):
    """fn(fd) must fail with `error` if the expectation says it reports, else succeed."""
    try:
        if expectation.reports:
            expect_errno(error, description, fn, fd)
        else:
            with step(description):
                fn(fd)
    except StepFailed as failed:
        if expectation.gap:
            raise KnownGap(f"{failed} [{expectation.gap}]", expectation.gap) from None
        raise
