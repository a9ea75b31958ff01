"""S4: edits through a shifting stack land on the underlay with ids mapped.

Three views of one file: on the underlay (what the host has on disk), through
the stack as the host sees it, and inside the container (a user namespace
mapping its 0..65535 to host 100000..165535).  A shifting stack makes the
container's ids equal the on-disk ids (Documentation/filesystems/idmappings.rst).
"""

import errno
import os
import stat
import struct

from fixtures import OVERFLOW_ID, Bug, Needs, Repro, case, check, expect_errno, step

SHIFT = Bug("shifted mounts: container ids must equal on-disk ids (shiftfs, idmapped mounts)",
            link="https://docs.kernel.org/filesystems/idmappings.html")
GROUPS = ("auto", "quick", "shift")
NEEDS = Needs(stack_traits=("shift",))

ACL_XATTR = "system.posix_acl_access"
ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_MASK, ACL_OTHER = 0x01, 0x02, 0x04, 0x10, 0x20
ACL_UNDEFINED_ID = 0xFFFFFFFF


def acl_naming_user(uid):
    """A POSIX ACL xattr (version 2) for a 0640 file that gives uid r--, as
    `setfacl -m u:<uid>:r` would: the mask stays r--, so the mode stays 0640."""
    entries = [(ACL_USER_OBJ, 6, ACL_UNDEFINED_ID), (ACL_USER, 4, uid), (ACL_GROUP_OBJ, 4, ACL_UNDEFINED_ID),
               (ACL_MASK, 4, ACL_UNDEFINED_ID), (ACL_OTHER, 0, ACL_UNDEFINED_ID)]
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


def acl_users(blob):
    """The uids named by ACL_USER entries of an ACL xattr."""
    return [ident for tag, _, ident in struct.iter_unpack("<HHI", blob[4:]) if tag == ACL_USER]


def _container_edits(root):
    def p(name):
        return os.path.join(root, name)
    with step("S4 container root: create P and Q through the stack, write Q"):
        os.close(os.open(p("P"), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        fd = os.open(p("Q"), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        os.write(fd, b"written by container root\n")
        os.close(fd)
    with step("S4 container root: chmod Q 0640"):
        os.chmod(p("Q"), 0o640)
    with step("S4 container root: chown Q to 1000:1000"):
        os.chown(p("Q"), 1000, 1000)
    with step("S4 container root: setxattr user.stackcheck on Q"):
        os.setxattr(p("Q"), "user.stackcheck", b"S4")
    with step("S4 container root: set a POSIX ACL naming uid 1000 on Q"):
        os.setxattr(p("Q"), ACL_XATTR, acl_naming_user(1000))
    with step("S4 container root: read the ACL back"):
        users = acl_users(os.getxattr(p("Q"), ACL_XATTR))
    check(users == [1000], "S4 the container reads back an ACL naming 1000", f"got {users}")
    with step("S4 container root: rename Q to R"):
        os.rename(p("Q"), p("R"))
    with step("S4 container root: create and unlink U"):
        os.close(os.open(p("U"), os.O_CREAT | os.O_WRONLY, 0o644))
        os.unlink(p("U"))
    with step("S4 container root: stat P and R"):
        return {name: (os.stat(p(name)).st_uid, os.stat(p(name)).st_gid) for name in ("P", "R")}


@case("stack/020", "Container root creates, chmods, chowns, sets xattrs and an ACL through the stack; "
      "the underlay holds the on-disk ids", GROUPS, bug=SHIFT,
      needs=Needs(stack_traits=("shift",), features=("user_xattr@{fs}",)))
def test_container_edits_land_on_disk(stack):
    seen = stack.run(_container_edits, stack.path())
    check(seen == {"P": (0, 0), "R": (1000, 1000)}, "S4 the container sees its own ids", f"got {seen}")
    st_p, st_r = os.stat(stack.on_underlay("P")), os.stat(stack.on_underlay("R"))
    check((st_p.st_uid, st_p.st_gid) == (0, 0), "S4 P created by container root is 0:0 on disk",
          f"got {st_p.st_uid}:{st_p.st_gid}")
    check((st_r.st_uid, st_r.st_gid) == (1000, 1000), "S4 R chowned to 1000 is 1000:1000 on disk",
          f"got {st_r.st_uid}:{st_r.st_gid}")
    check(stat.S_IMODE(st_r.st_mode) == 0o640, "S4 R has mode 0640 on disk", f"got {stat.S_IMODE(st_r.st_mode):o}")
    check(os.getxattr(stack.on_underlay("R"), "user.stackcheck") == b"S4", "S4 the user xattr is on disk")
    users = acl_users(os.getxattr(stack.on_underlay("R"), ACL_XATTR))
    check(users == [1000], "S4 the ACL names uid 1000 on disk", f"got {users}")
    check(not os.path.lexists(stack.on_underlay("Q")), "S4 Q is gone on disk after the rename")
    check(not os.path.lexists(stack.on_underlay("U")), "S4 U is gone on disk after the unlink")


def _container_looks(root):
    owners = {}
    for name in ("u1000", "u70000"):
        with step(f"S4 container: stat {name} through the stack"):
            st = os.stat(os.path.join(root, name))
        owners[name] = (st.st_uid, st.st_gid)
    expect_errno(errno.EINVAL, "S4 container root: chown u1000 to 70000 (outside its map)",
                 os.chown, os.path.join(root, "u1000"), 70000, 70000)
    return owners


@case("stack/021", "The container sees on-disk uid 1000 as 1000 and uid 70000 (outside the map) as 65534",
      GROUPS, bug=SHIFT, needs=NEEDS)
def test_host_owned_files_seen_from_container(stack):
    for name, ident in (("u1000", 1000), ("u70000", 70000)):
        with open(stack.host_path(name), "w") as f:
            f.write(name)
        os.chown(stack.host_path(name), ident, ident)
    owners = stack.run(_container_looks, stack.path())
    check(owners["u1000"] == (1000, 1000), "S4 on-disk 1000 shows as 1000 in the container",
          f"got {owners['u1000']}")
    check(owners["u70000"] == (OVERFLOW_ID, OVERFLOW_ID), "S4 on-disk 70000 shows as the overflow id 65534",
          f"got {owners['u70000']}")


UNMAPPED_REPRO = Repro(
    "a caller whose ids the stack cannot map (host root: the container's map is 100000..165535) cannot "
    "create or chown through it: EOVERFLOW, as idmapped mounts and shiftfs refuse "
    "(Documentation/filesystems/idmappings.rst)", """
with open(os.path.join(HOST, "existing"), "w") as f:
    f.write("host file")
for what, call in (("create a file", lambda: os.close(os.open(os.path.join(MNT, "new"), os.O_CREAT | os.O_WRONLY, 0o644))),
                   ("mkdir", lambda: os.mkdir(os.path.join(MNT, "newdir"))),
                   ("chown a file to 0:0", lambda: os.chown(os.path.join(MNT, "existing"), 0, 0))):
    show("host root: " + what + " through the stack", attempt(call) or "success", "EOVERFLOW")
for name in ("new", "newdir"):
    if os.path.exists(os.path.join(HOST, name)):
        st = os.stat(os.path.join(HOST, name))
        print(f"      {name} on the underlay is owned by {st.st_uid}:{st.st_gid}, which the container sees as its root")
""")


@case("stack/022", "Host root, whose ids the stack cannot map, gets EOVERFLOW creating or chowning through it",
      GROUPS, bug=SHIFT, needs=NEEDS, repro=UNMAPPED_REPRO)
def test_unmapped_host_root_gets_eoverflow(stack):
    with open(stack.host_path("existing"), "w") as f:
        f.write("host file")
    expect_errno(errno.EOVERFLOW, "S4 host root: create a file through the stack",
                 os.open, stack.path("new"), os.O_CREAT | os.O_WRONLY, 0o644)
    expect_errno(errno.EOVERFLOW, "S4 host root: mkdir through the stack", os.mkdir, stack.path("newdir"))
    expect_errno(errno.EOVERFLOW, "S4 host root: chown a file to 0:0 through the stack",
                 os.chown, stack.path("existing"), 0, 0)
