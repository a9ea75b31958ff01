"""python -m harness.stackfs shift SOURCE MOUNTPOINT | union LOWER[:LOWER] UPPER MOUNTPOINT [options]

Runs stackfs in the foreground until its mount is unmounted."""

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
from harness.stackfs.union import UnionFS


def _idmap(text):
    inside, outside, count = (int(part) for part in text.split(":"))
    return IdMap(inside, outside, count)


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m harness.stackfs", description=__doc__)
    p.add_argument("mode", choices=["shift", "union"])
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="shift: SOURCE MOUNTPOINT; union: LOWER[:LOWER...] UPPER MOUNTPOINT")
    p.add_argument("--userxattr", action="store_true",
                   help="union: opaque directories by user.overlay.opaque (as overlayfs' userxattr)")
    p.add_argument("--map", type=_idmap, default=CONTAINER_MAP, metavar="INSIDE:OUTSIDE:COUNT",
                   help="container ids INSIDE.. are host ids OUTSIDE.. (default 0:100000:65536)")
    p.add_argument("--bug", action="append", default=[], choices=sorted(bug_switches.BUGS),
                   help="bring back a historical bug (repeatable)")
    p.add_argument("--fsname", default="stackcheck-stackfs", help="the mount's source name")
    p.add_argument("--ready-fd", type=int, help="write 'ready' to this fd once mounted")
    p.add_argument("--debug", action="store_true")
    args = p.parse_args(argv)
    if len(args.paths) != {"shift": 2, "union": 3}[args.mode]:
        p.error(f"{args.mode} mode takes " + ("SOURCE MOUNTPOINT" if args.mode == "shift"
                                              else "LOWER[:LOWER...] UPPER MOUNTPOINT"))
    args.mountpoint = args.paths[-1]
    return args


def main(argv=None):
    args = parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="stackfs %(levelname)s %(message)s")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # an O_PATH fd per known inode
    bugs = bug_switches.parse(args.bug)
    if args.mode == "shift":
        ops = ShiftFS(args.paths[0], args.map, bugs)
    else:
        ops = UnionFS(args.paths[0].split(":"), args.paths[1], bugs, userxattr=args.userxattr)
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
