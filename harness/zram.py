"""zram block devices of stackcheck's own, for underlays on a compressed RAM disk
(the machine of LP#1879196 kept its containers on ext4 over zram).

A device is added through /sys/class/zram-control/hot_add, so devices others
made (a zram swap) are never touched.  Its number is recorded in the run
directory before it is used: a crashed run's successor removes it, after
checking that it still carries our filesystem label or was never set up.
"""

import errno
import glob
import os

from harness.rundir import TAG

CONTROL = "/sys/class/zram-control"
# ext4's superblock starts 1024 bytes in; its volume name is 120 bytes into it.
EXT4_LABEL_OFFSET, EXT4_LABEL_SIZE = 1024 + 120, 16


def unavailable():
    """Why zram devices cannot be made here, or None."""
    if not os.path.exists(os.path.join(CONTROL, "hot_add")):
        return f"no zram: {CONTROL} is missing (kernel without CONFIG_ZRAM, or the zram module not loaded)"
    return None


def _sys(number, attribute):
    return f"/sys/block/zram{number}/{attribute}"


def _record(directory, number):
    return os.path.join(directory, f"zram.{number}")


class ZramDevice:
    def __init__(self, record_dir):
        self.record_dir = record_dir
        self.number = None
        self.path = None

    def create(self, size):
        with open(os.path.join(CONTROL, "hot_add")) as f:
            self.number = int(f.read())
        open(_record(self.record_dir, self.number), "w").close()
        self.path = f"/dev/zram{self.number}"
        with open(_sys(self.number, "disksize"), "w") as f:
            f.write(str(size))
        return self

    def algorithm(self):
        with open(_sys(self.number, "comp_algorithm")) as f:
            return next((w.strip("[]") for w in f.read().split() if w.startswith("[")), "?")

    def destroy(self):
        if self.number is None:
            return
        remove(self.number)
        os.unlink(_record(self.record_dir, self.number))
        self.number = self.path = None

    def __repr__(self):
        return f"ZramDevice({self.path})"


def remove(number):
    """Reset (free its memory) and remove one device; EBUSY while something still
    holds it open, e.g. a mount a dying mount namespace has not dropped yet."""
    try:
        with open(os.path.join(CONTROL, "hot_remove"), "w") as f:
            f.write(str(number))
    except OSError as e:
        if e.errno != errno.ENODEV:  # gone already
            raise


def _ours(number):
    """A recorded device is still ours if it was never set up or carries our label."""
    try:
        with open(_sys(number, "disksize")) as f:
            if int(f.read()) == 0:
                return True
        with open(f"/dev/zram{number}", "rb") as dev:
            dev.seek(EXT4_LABEL_OFFSET)
            return dev.read(EXT4_LABEL_SIZE).rstrip(b"\0") == TAG.encode()
    except OSError:
        return False


def remove_recorded(directory):
    """Remove the zram devices recorded under directory (a dead run's); returns them."""
    found = []
    for record in sorted(glob.glob(os.path.join(glob.escape(directory), "**", "zram.*"), recursive=True)):
        number = int(record.rsplit(".", 1)[1])
        if os.path.exists(_sys(number, "disksize")) and _ours(number):
            try:
                remove(number)
                found.append(f"/dev/zram{number}")
            except OSError as e:
                found.append(f"/dev/zram{number} (still held, not removed: {errno.errorcode.get(e.errno)})")
    return found
