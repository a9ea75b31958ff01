"""Device-mapper devices, found through sysfs and removed with dmsetup.

Only names with the caller's prefix are ever touched.  Works without udev.
"""

import os
import shutil
import subprocess

DMSETUP_ENV = dict(os.environ, DM_DISABLE_UDEV="1")


def names():
    found = []
    try:
        entries = os.listdir("/sys/block")
    except FileNotFoundError:
        return found
    for entry in entries:
        if entry.startswith("dm-"):
            try:
                with open(f"/sys/block/{entry}/dm/name") as f:
                    found.append(f.read().strip())
            except OSError:
                pass
    return found


def remove_with_prefix(prefix):
    removed = []
    dmsetup = shutil.which("dmsetup")
    for name in names():
        if name.startswith(prefix) and dmsetup:
            subprocess.run([dmsetup, "remove", "--noudevsync", "--retry", name],
                           env=DMSETUP_ENV, capture_output=True, check=False)
            removed.append(name)
    return removed
