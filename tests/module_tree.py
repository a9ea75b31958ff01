"""A kernel module of our own for the tests of --module: a DKMS tree that builds in
seconds and that every clone has, unlike the real shiftfs beside some clones.

The module does nothing but load and unload.  It is out of tree and unsigned, so
loading it taints the kernel with O and E.
"""

import os

NAME = "stackcheck_hello"
DESCRIPTION = "stackcheck's own test module"
SOURCE = f"""\
#include <linux/init.h>
#include <linux/module.h>

static int __init stackcheck_hello_init(void)
{{
	return 0;
}}

static void __exit stackcheck_hello_exit(void)
{{
}}

module_init(stackcheck_hello_init);
module_exit(stackcheck_hello_exit);
MODULE_DESCRIPTION("{DESCRIPTION}");
MODULE_LICENSE("GPL");
"""
# No MAKE: DKMS's own default (make -C $kernel_source_dir M=<its build copy>) builds it.
DKMS_CONF = f"""\
PACKAGE_NAME="{NAME}"
PACKAGE_VERSION="1.0"
BUILT_MODULE_NAME[0]="{NAME}"
DEST_MODULE_LOCATION[0]="/extra"
BUILD_EXCLUSIVE_KERNEL="^6\\."
"""


def write_kbuild_tree(directory):
    """The module as a plain Kbuild directory (made if missing); its absolute path."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "Kbuild"), "w") as f:
        f.write(f"obj-m := {NAME}.o\n")
    with open(os.path.join(directory, f"{NAME}.c"), "w") as f:
        f.write(SOURCE)
    return os.path.abspath(directory)


def write_dkms_tree(directory):
    """The module as a DKMS tree (made if missing); its absolute path."""
    write_kbuild_tree(directory)
    with open(os.path.join(directory, "dkms.conf"), "w") as f:
        f.write(DKMS_CONF)
    return os.path.abspath(directory)
