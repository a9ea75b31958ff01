"""Fault backends: a block device for an underlay that fails chosen byte ranges.

Every module here registers one backend; the probe picks the first this
machine can run.  A device offers fail(ranges), drop_writes(ranges),
fail_all(), heal() and destroy(); ranges are (byte offset, length) on the
device, as FIEMAP gives them for a file's data.
"""

import importlib
import pkgutil

_BACKENDS = {}  # name -> class, in preference order


def register(cls):
    _BACKENDS[cls.name] = cls
    return cls


def backends():
    return dict(_BACKENDS)


def choose(probe):
    """(backend class, None) for the first usable backend, or (None, why none is)."""
    reasons = []
    for cls in sorted(_BACKENDS.values(), key=lambda c: c.preference):
        why = cls.unavailable(probe)
        if why is None:
            return cls, None
        reasons.append(f"{cls.name}: {why}")
    return None, "no fault backend: " + "; ".join(reasons)


for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
