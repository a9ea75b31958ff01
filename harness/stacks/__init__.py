"""The stack registry: every module in this package registers its stack kinds.

Adding a kind is one new file here that subclasses Stack and decorates it with
@register; no case and no fixture changes.
"""

import fnmatch
import importlib
import pkgutil

from harness.stacks.base import Stack

_VARIANTS = {}  # variant name ("overlay_volatile") -> Stack subclass


def register(cls):
    for variant in cls.variants:
        if variant in _VARIANTS:
            raise ValueError(f"stack variant {variant} registered twice")
        _VARIANTS[variant] = cls
    return cls


def _load():
    for module in pkgutil.iter_modules(__path__):
        if module.name != "base":
            importlib.import_module(f"{__name__}.{module.name}")


def variants():
    """All variant names, in registration order."""
    return list(_VARIANTS)


def default_variants():
    """The variants a run without --stack uses: all but those that run only when
    asked for (other people's stacks, whose findings are theirs, not the kernel's)."""
    return [v for v, cls in _VARIANTS.items() if cls.in_default_run]


def stack_class(variant):
    return _VARIANTS[variant]


def unavailable(variant, fstype, probe):
    """Why this machine cannot mount variant over an fstype underlay, or None."""
    from harness import scratch
    from harness.needs import Needs
    return (scratch.unavailable(fstype, probe)
            or Needs(features=stack_class(variant).features(variant),
                     commands=stack_class(variant).commands(variant)).unmet(probe, fstype))


def matches(pattern, variant):
    """Whether pattern names variant: a glob over variant names, or a kind
    ("fuse": every FUSE stack, the bundled one, bindfs and command templates alike)."""
    cls = _VARIANTS.get(variant)
    return fnmatch.fnmatchcase(variant, pattern) or (cls is not None and cls.kind == pattern)


def select(names):
    """Variants by name or glob ("overlay", "overlay*"); a kind name that is not
    itself a variant ("fuse") stands for all of that kind's variants."""
    chosen = []
    for name in names:
        matched = [v for v in _VARIANTS if fnmatch.fnmatchcase(v, name)]
        matched = matched or [v for v, cls in _VARIANTS.items() if cls.kind == name]
        if not matched:
            raise KeyError(name)
        chosen += [v for v in matched if v not in chosen]
    return chosen


_load()

__all__ = ["Stack", "register", "variants", "default_variants", "stack_class", "select", "matches", "unavailable"]
