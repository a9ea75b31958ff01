"""Id shifting between the host's view and the disk, as shiftfs does.

With the container map 0..65535 = host 100000..165535, on-disk id N shows to
the host as 100000+N (so to the container as N).  On-disk ids outside the map
show as the overflow id 65534; setting an id the map cannot hold fails with
EOVERFLOW, as the kernel answers for idmapped mounts.  POSIX ACL xattrs carry
ids too, and are shifted the same way.
"""

import errno
import struct

from pyfuse3 import FUSEError

from harness.container import OVERFLOW_ID

ACL_XATTRS = (b"system.posix_acl_access", b"system.posix_acl_default")
ACL_USER, ACL_GROUP = 0x02, 0x08
_ENTRY = struct.Struct("<HHI")


class IdShift:
    def __init__(self, idmap):
        self.map = idmap  # None: ids pass unchanged

    def to_host(self, disk_id):
        if self.map is None:
            return disk_id
        offset = disk_id - self.map.inside
        return offset + self.map.outside if 0 <= offset < self.map.count else OVERFLOW_ID

    def to_disk(self, host_id):
        if self.map is None or host_id == 0xFFFFFFFF:
            return host_id
        offset = host_id - self.map.outside
        if not 0 <= offset < self.map.count:
            raise FUSEError(errno.EOVERFLOW)
        return offset + self.map.inside

    def _acl(self, name, value, convert):
        name = name if isinstance(name, bytes) else name.encode()
        if self.map is None or name not in ACL_XATTRS or len(value) < 4:
            return value
        out = [value[:4]]
        for tag, perm, ident in _ENTRY.iter_unpack(value[4:]):
            out.append(_ENTRY.pack(tag, perm, convert(ident) if tag in (ACL_USER, ACL_GROUP) else ident))
        return b"".join(out)

    def acl_to_host(self, name, value):
        return self._acl(name, value, self.to_host)

    def acl_to_disk(self, name, value):
        return self._acl(name, value, self.to_disk)
