"""Modules under test in the running kernel: insmod before the run, and rmmod of
exactly what stackcheck loaded after it (harness/modules.py builds them).

A module named like one already loaded replaces it only when nothing uses it;
the one it replaced is loaded again afterwards (modprobe), so the host ends as
it began.
"""

import os
import subprocess


class KmodError(Exception):
    """One line: the run cannot load its modules."""


def unavailable():
    """Why this kernel cannot load modules, or None."""
    if not os.path.exists("/proc/modules"):
        return f"kernel {os.uname().release} has no module loading (no /proc/modules)"
    try:
        with open("/proc/sys/kernel/modules_disabled") as f:
            if f.read().strip() != "0":
                return "module loading is disabled (/proc/sys/kernel/modules_disabled)"
    except OSError:
        pass
    return None


def _run(argv):
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode:
        raise KmodError(f"{' '.join(argv)} failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")


class HostModules:
    """Loads the built modules for the length of a `with` block."""

    def __init__(self, built):
        self.built = list(built)
        self.loaded, self.replaced = [], []

    def _make_room(self, name):
        sysdir = f"/sys/module/{name}"
        if not os.path.isdir(sysdir):
            return
        if not os.path.exists(os.path.join(sysdir, "initstate")):
            raise KmodError(f"{name} is built into kernel {os.uname().release}: a module cannot replace it")
        with open(os.path.join(sysdir, "refcnt")) as f:
            users = int(f.read())
        holders = os.listdir(os.path.join(sysdir, "holders"))
        if users or holders:
            raise KmodError(f"module {name} is loaded and in use (refcnt {users}"
                            + (f", held by {' '.join(holders)}" if holders else "") + "): stackcheck will not replace it")
        _run(["rmmod", name])
        self.replaced.append(name)

    def __enter__(self):
        try:
            for module in self.built:
                name = module.name.replace("-", "_")
                self._make_room(name)
                _run(["insmod", module.path])
                self.loaded.append(name)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        for name in reversed(self.loaded):
            _run(["rmmod", name])
        self.loaded.clear()
        for name in self.replaced:
            _run(["modprobe", name])
        self.replaced.clear()
