"""python -m harness.stackfs shift SOURCE MOUNTPOINT [options]: run stackfs in the foreground."""

import argparse
import logging
import os
import resource
import sys

import pyfuse3
import trio

from harness.container import CONTAINER_MAP, IdMap
from harness.stackfs import bugs as bug_switches
from harness.stackfs.passthrough import ShiftFS


def _idmap(text):
    inside, outside, count = (int(part) for part in text.split(":"))
    return IdMap(inside, outside, count)


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m harness.stackfs", description=__doc__)
    p.add_argument("mode", choices=["shift"])
    p.add_argument("source")
    p.add_argument("mountpoint")
    p.add_argument("--map", type=_idmap, default=CONTAINER_MAP, metavar="INSIDE:OUTSIDE:COUNT",
                   help="container ids INSIDE.. are host ids OUTSIDE.. (default 0:100000:65536)")
    p.add_argument("--bug", action="append", default=[], choices=sorted(bug_switches.BUGS),
                   help="bring back a historical bug (repeatable)")
    p.add_argument("--fsname", default="stackcheck-stackfs", help="the mount's source name")
    p.add_argument("--ready-fd", type=int, help="write 'ready' to this fd once mounted")
    p.add_argument("--debug", action="store_true")
    return p.parse_args(argv)


def main(argv=None):
    args = parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="stackfs %(levelname)s %(message)s")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # an O_PATH fd per known inode
    ops = ShiftFS(args.source, args.map, bug_switches.parse(args.bug))
    options = set(pyfuse3.default_options) | {f"fsname={args.fsname}", "subtype=stackfs",
                                               "allow_other", "dev", "suid"}
    pyfuse3.init(ops, args.mountpoint, options)
    if args.ready_fd is not None:
        os.write(args.ready_fd, b"ready\n")
        os.close(args.ready_fd)
    try:
        trio.run(pyfuse3.main)  # returns when the filesystem is unmounted
    finally:
        pyfuse3.close(unmount=False)


if __name__ == "__main__":
    main()
