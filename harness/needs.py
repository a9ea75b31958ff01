"""What a case needs, as data (after LTP's struct tst_test), and why it is unmet.

Two kinds of condition, kept apart on purpose:
- applicability (stack traits, underlay filesystems): a case that cannot mean
  anything on a stack is not generated for it at all;
- machine needs (kernel features, kernel version, commands): a case whose needs
  the machine lacks is generated and reported "not run: <reason>".
"""

from dataclasses import dataclass

from harness import scratch
from harness.probe import kernel_version


@dataclass(frozen=True)
class Bug:
    """The report a case guards: a Launchpad bug, a kernel commit, a thread."""
    title: str
    lp: int | None = None
    commit: str | None = None
    link: str | None = None

    def describe(self):
        refs = []
        if self.lp:
            refs.append(f"LP#{self.lp}")
        if self.commit:
            refs.append(f"linux-git {self.commit}")
        if self.link:
            refs.append(self.link)
        return f"{self.title} ({', '.join(refs)})" if refs else self.title


@dataclass(frozen=True)
class Needs:
    stack_traits: tuple = ()    # the stack must have all of these ("shift", "union")
    not_traits: tuple = ()      # and none of these ("volatile")
    filesystems: tuple = ()     # underlays the case means something on (empty: all)
    features: tuple = ()        # probe features; "{fs}" stands for the underlay
    min_kernel: str | None = None
    commands: tuple = ()

    def applies_to(self, stack_traits, fstype):
        return (set(self.stack_traits) <= set(stack_traits) and not set(self.not_traits) & set(stack_traits)
                and (not self.filesystems or fstype in self.filesystems))

    def unmet(self, probe, fstype):
        """The reason the machine cannot run this, or None."""
        if self.min_kernel and kernel_version(probe.kernel) < kernel_version(self.min_kernel):
            return f"kernel {probe.kernel} is older than {self.min_kernel}"
        for feature in self.features:
            name = feature.format(fs=scratch.filesystem_of(fstype))  # ext4-zram has ext4's features
            if not probe.feature(name):
                return probe.reason(name)
        for command in self.commands:
            if not probe.tools.get(command):
                return f"{command} not found on PATH"
        return None
