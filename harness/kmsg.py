"""The kernel log around a case, read from /dev/kmsg, as xfstests' _check_dmesg does.

A watcher opens /dev/kmsg at the end of the log when a case starts and reads
what the kernel said until it ends.  Lines that mean the kernel is unhealthy
(WARNING, BUG, Oops, hung tasks, lockdep splats) fail the case.
"""

import errno
import os
import re

BAD = re.compile(
    r"WARNING:|BUG:|Oops|general protection fault|kernel BUG at|"
    r"blocked for more than|possible circular locking|possible recursive locking|"
    r"inconsistent lock state|suspicious RCU usage|UBSAN:|KASAN:|Call Trace:"
)
# stackcheck's own tests inject a line with this marker and a run id to prove
# the check works; only the run it names counts it.
INJECTED = "stackcheck-selftest-kmsg"


class KernelLog:
    def __init__(self):
        self.fd = None
        try:
            self.fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            os.lseek(self.fd, 0, os.SEEK_END)
        except OSError:
            self.fd = None

    @property
    def available(self):
        return self.fd is not None

    def read(self):
        """Lines logged since the watcher started (or since the last read)."""
        lines = []
        while self.fd is not None:
            try:
                record = os.read(self.fd, 8192)
            except OSError as e:
                if e.errno == errno.EAGAIN:
                    break
                if e.errno == errno.EPIPE:  # overwritten before we read it: go on
                    continue
                raise
            if not record:
                break
            prefix, _, text = record.decode(errors="replace").partition(";")
            fields = prefix.split(",")
            stamp = int(fields[2]) / 1e6 if len(fields) > 2 and fields[2].isdigit() else 0.0
            lines.append(f"[{stamp:12.6f}] {text.splitlines()[0] if text else ''}")
        return lines

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def bad_lines(lines, run_id):
    return [line for line in lines
            if BAD.search(line) and (INJECTED not in line or f"run={run_id}" in line)]


def inject(message, run_id):
    """Write a line into the kernel log (root only), marked for run_id."""
    with open("/dev/kmsg", "w") as f:
        f.write(f"{message} {INJECTED} run={run_id}\n")
