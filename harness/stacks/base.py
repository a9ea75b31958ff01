"""What every stack kind shares: where things are, and who works through it."""

import contextlib
import logging
import os

from harness import container, mounts

log = logging.getLogger("stackcheck.stack")


class Stack:
    """A mount stacked on a scratch underlay.

    Subclasses set kind, variants (variant name -> settings), traits and
    user_map, and implement mount() and _unmount().
    """

    kind = ""
    variants = {}
    # "shift": container ids equal on-disk ids; "union": layers, copy-up.
    traits = frozenset()
    # Who works through the stack: a container (an IdMap) or host root (None).
    user_map = None
    # Why changes made on the underlay while mounted are undefined, or "".
    underlay_changes_undefined = ""
    # False: the variant runs only when named (--stack NAME, a glob or its kind).
    in_default_run = True

    def __init__(self, variant, underlay, workdir, options=None):
        self.variant = variant
        self.settings = self.variants[variant]
        self.options = dict(options or {})  # --stack-option KEY=VALUE, for kinds that take them
        self.underlay = underlay
        self.workdir = workdir
        self.mountpoint = os.path.join(workdir, "mnt")
        self.mounted = False
        self._users = []  # processes started through start(): ended before any unmount

    @classmethod
    def features(cls, variant):
        """Probe features the variant needs; "{fs}" stands for the underlay."""
        return ()

    @classmethod
    def commands(cls, variant):
        """Programs the variant runs: one missing from PATH makes its cases not run."""
        return ()

    @classmethod
    def version(cls):
        """The stack program's version, for the results ("" for the kernel's own)."""
        return ""

    @classmethod
    def variant_traits(cls, variant):
        """The kind's traits and the variant's own (settings["traits"])."""
        return cls.traits | frozenset(cls.variants[variant].get("traits", ()))

    def mount(self):
        raise NotImplementedError

    def _unmount(self):
        mounts.unmount(self.mountpoint)

    def unmount(self):
        # A stack user a failed case left running holds a copy of the mounts in
        # its namespace: end it first, or the underlay outlives its umount.
        for user in self._users:
            user.close()
        self._users.clear()
        if self.mounted:
            watched = self.superblock_path()
            with mounts.superblock_gone(watched, self.describe()) if watched else contextlib.nullcontext():
                self._unmount()
                self.mounted = False
            log.info("unmounted %s", self.variant)

    def superblock_path(self):
        """Where the stack's own superblock is mounted: unmount() returns only once
        it is gone (mounts.SuperblockWatch), since mounting the same layers again
        while it lives fails (overlayfs: upperdir in use, EBUSY).  None: the
        stack has no superblock of its own to wait for."""
        return self.mountpoint

    def remount(self):
        """Unmount the stack and mount it again on the same underlay: it then shows
        the layers as they are now, without relying on changes made while mounted."""
        self.unmount()
        self.mount()

    def cycle(self):
        """Unmount the stack and its underlay, then mount both again: what is
        read afterwards comes from the device, not from a cache."""
        self.unmount()
        self.underlay.remount()
        self.mount()

    def path(self, *rel):
        """rel through the stack."""
        return os.path.join(self.mountpoint, *rel)

    def host_path(self, *rel):
        """Where a host process edits to change what the stack shows at rel."""
        raise NotImplementedError

    def on_underlay(self, *rel):
        """Where the object at rel lives on the underlay now."""
        return self.host_path(*rel)

    def start(self, fn, *args, beside=None):
        """Start fn(channel, *args) in a process of the stack's user (see
        container.start); beside=<a running Child>: in the same container."""
        if beside is not None and self.user_map is not None:
            user = container.start(fn, *args, join=beside.pid)
        else:
            user = container.start(fn, *args, idmap=self.user_map)
        self._users.append(user)
        return user

    def run(self, fn, *args, beside=None):
        """fn(*args) in a process of the stack's user; returns fn's result."""
        return self.start(lambda _channel, *a: fn(*a), *args, beside=beside).result()

    def host_ids(self, container_id):
        """The id a container id has on the host (itself when there is no container)."""
        return self.user_map.to_host(container_id) if self.user_map else container_id

    def describe(self):
        opts = "".join(f", {k}={v}" for k, v in sorted(self.options.items()))
        return f"{self.variant}{opts} at {self.mountpoint} over {self.underlay.describe()}"


class ShiftingStack(Stack):
    """A stack that shows one source directory of the underlay with ids shifted
    for a container (idmapped mounts, shiftfs, FUSE shift mode)."""

    traits = frozenset({"shift"})
    user_map = container.CONTAINER_MAP

    def __init__(self, variant, underlay, workdir, options=None):
        super().__init__(variant, underlay, workdir, options)
        self.source = underlay.path("source")

    def _make_dirs(self):
        os.makedirs(self.source, exist_ok=True)
        os.makedirs(self.mountpoint, exist_ok=True)

    def host_path(self, *rel):
        return os.path.join(self.source, *rel)


class LayeredStack(Stack):
    """A union of a lower and an upper directory of the underlay (overlayfs, FUSE
    union mode).  Host-side edits go to the lower layer, as the scenarios say."""

    traits = frozenset({"union"})

    def __init__(self, variant, underlay, workdir, options=None):
        super().__init__(variant, underlay, workdir, options)
        self.lower, self.upper, self.work = (underlay.path(d) for d in ("lower", "upper", "work"))

    def _make_dirs(self):
        for d in (self.lower, self.upper, self.work, self.mountpoint):
            os.makedirs(d, exist_ok=True)

    def host_path(self, *rel):
        return os.path.join(self.lower, *rel)

    def on_underlay(self, *rel):
        upper = os.path.join(self.upper, *rel)
        return upper if os.path.lexists(upper) else os.path.join(self.lower, *rel)


class DaemonStack(Stack):
    """A stack served by a FUSE daemon (harness/fusedaemon.py): started in the
    foreground, waited for, stopped by unmount; a crash fails the case."""

    daemon = None
    daemon_ready = "fd"
  # how the daemon says it is mounted: --ready-fd, or "mount" (watch the table)

    def daemon_argv(self):
        raise NotImplementedError

    def superblock_path(self):
        # The daemon's exit shows its superblock gone (fusedaemon waits for it); a watch's
        # permission check on the mount's root would ask the daemon, which may be hung.
        return None

    def bug_arguments(self):
        """--bug NAME for each name in the stack option bug=NAME[,NAME]."""
        return [arg for bug in self.options.get("bug", "").split(",") if bug for arg in ("--bug", bug)]

    def mount(self):
        from harness.fusedaemon import FuseDaemon
        self._make_dirs()
        argv = self.daemon_argv()
        log.info("%s: %s", self.variant, " ".join(argv))
        self.daemon = FuseDaemon(argv, self.mountpoint, self.workdir, self.variant, ready=self.daemon_ready)
        self.daemon.start()
        self.mounted = True

    def _unmount(self):
        problem = self.daemon.stop()
        if problem:
            raise RuntimeError(problem)
