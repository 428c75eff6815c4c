"""Extended attributes: inline and shared entries, built-in and long name prefixes.

Follows the kernel's ``fs/erofs/xattr.c``: the inode body holds an
``erofs_xattr_ibody_header`` with ``h_shared_count`` 4-byte ids of shared
entries (at ``xattr_blkaddr`` blocks + id * 4, or in the metabox when
``SHARED_EA_IN_METABOX``), then inline ``erofs_xattr_entry`` records, each
padded to 4 bytes.  ``e_name_index`` with bit 7 set names a long prefix
(``erofs_xattr_long_prefix``: a base index + an infix) from the table at
``xattr_prefix_start * 4`` in the packed inode, the metabox, or (with
``PLAIN_XATTR_PFX``) the plain metadata.  POSIX ACLs are returned raw.
"""

from __future__ import annotations

import errno
from collections.abc import Callable

from ..errors import CorruptedError, UnsupportedError
from . import layout as L
from .inode import Inode
from .superblock import Superblock

ReadMeta = Callable[[int, int, bool], bytes]


def parse_prefix_table(blob_reader: Callable[[int, int], bytes], start: int, count: int) -> list[bytes]:
    """Long xattr name prefixes -> full prefixes (base prefix + infix).

    ``blob_reader(pos, n)`` reads the area the table lives in (``erofs_read_metadata``
    records: le16 length, then the bytes, each record 4-byte aligned).
    """
    out = []
    pos = start
    for i in range(count):
        pos = (pos + 3) & ~3
        hdr = blob_reader(pos, 2)
        if len(hdr) < 2:
            raise CorruptedError(f"xattr prefix {i}: table truncated")
        length = int.from_bytes(hdr, "little")
        if length < 1 or length > L.EROFS_NAME_LEN + 1:
            raise CorruptedError(f"xattr prefix {i}: bad length {length}")
        rec = blob_reader(pos + 2, length)
        if len(rec) < length:
            raise CorruptedError(f"xattr prefix {i}: table truncated")
        pos += 2 + length
        base = L.XATTR_PREFIXES.get(rec[0])
        if base is None:
            raise CorruptedError(f"xattr prefix {i}: unknown base index {rec[0]}")
        out.append(base + rec[1:])
    return out


def _entry_name(index: int, name: bytes, prefixes: list[bytes], where: str) -> bytes | None:
    if index & L.EROFS_XATTR_LONG_PREFIX:
        i = index & L.EROFS_XATTR_LONG_PREFIX_MASK
        if i >= len(prefixes):
            # the kernel skips such an entry, listing and matching alike (fs/erofs/xattr.c
            # erofs_listxattr_foreach / erofs_xattr_entry_match: prefix beyond xattr_prefix_count)
            return None
        return prefixes[i] + name
    base = L.XATTR_PREFIXES.get(index)
    if base is None:
        return None  # e.g. lustre: the kernel does not list it
    return base + name


def _read_entry(read: Callable[[int, int], bytes], pos: int, where: str) -> tuple[int, int, bytes, bytes]:
    hdr = read(pos, L.XATTR_ENTRY.size)
    if len(hdr) < L.XATTR_ENTRY.size:
        raise CorruptedError(f"{where}: xattr entry truncated")
    name_len, index, value_size = L.XATTR_ENTRY.unpack(hdr)
    body = read(pos + L.XATTR_ENTRY.size, name_len + value_size)
    if len(body) < name_len + value_size:
        raise CorruptedError(f"{where}: xattr entry truncated")
    size = (L.XATTR_ENTRY.size + name_len + value_size + 3) & ~3
    return size, index, body[:name_len], body[name_len:]


def read_xattrs(sb: Superblock, inode: Inode, read_meta: ReadMeta,
                prefixes: list[bytes]) -> list[tuple[bytes, bytes]]:
    """All ``(full name, value)`` pairs of ``inode``: inline, then shared (the kernel's listxattr order)."""
    if not inode.xattr_isize:
        return []
    where = f"inode {inode.nid}"
    base = inode.iloc + inode.inode_isize
    hdr = read_meta(base, inode.xattr_isize, inode.in_metabox)
    if len(hdr) < inode.xattr_isize:
        raise CorruptedError(f"{where}: xattr body truncated")
    if inode.xattr_isize == L.XATTR_IBODY_HEADER.size:
        # fs/erofs/xattr.c erofs_init_inode_xattrs: a bare header is "not supported yet"
        raise UnsupportedError(f"{where}: xattr_isize {inode.xattr_isize} is not supported")
    _filter, shared_count, _r = L.XATTR_IBODY_HEADER.unpack_from(hdr)
    header_sz = L.XATTR_IBODY_HEADER.size + 4 * shared_count
    if header_sz > inode.xattr_isize:
        # the kernel does not bound h_shared_count by the body: the ids run on into whatever
        # follows, and no inline entries remain (erofs_init_inode_xattrs, erofs_xattr_iter_inline)
        hdr = read_meta(base, header_sz, inode.in_metabox)
        if len(hdr) < header_sz:
            raise CorruptedError(f"{where}: shared xattr ids truncated")
    out: list[tuple[bytes, bytes]] = []
    in_mbox_shared = sb.has_compat(L.EROFS_FEATURE_COMPAT_SHARED_EA_IN_METABOX)
    shared_base = sb.xattr_blkaddr << sb.blkszbits
    pos = header_sz
    local = lambda p, n: hdr[p:p + n]  # noqa: E731 - the inline area is already in memory
    while pos < inode.xattr_isize:
        size, index, name, value = _read_entry(local, pos, where)
        if pos + size > inode.xattr_isize:
            raise CorruptedError(f"{where}: xattr entry beyond xattr_isize")
        full = _entry_name(index, name, prefixes, where)
        if full is not None:
            out.append((full, value))
        pos += size
    for i in range(shared_count):
        xid = int.from_bytes(hdr[12 + 4 * i:16 + 4 * i], "little")
        _, index, name, value = _read_entry(
            lambda p, n: read_meta(p, n, in_mbox_shared), shared_base + xid * 4, f"{where} shared xattr {xid}")
        full = _entry_name(index, name, prefixes, where)
        if full is not None:
            out.append((full, value))
    return out


POSIX_ACL_NAMES = (b"system.posix_acl_access", b"system.posix_acl_default")
_ACL_USER_OBJ, _ACL_USER, _ACL_GROUP_OBJ, _ACL_GROUP, _ACL_MASK, _ACL_OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20


def posix_acl_value(raw: bytes, where: str) -> bytes | None:
    """A POSIX ACL xattr as getxattr(2) returns it from the kernel, or None (no ACL: ENODATA).

    The kernel never hands the stored bytes out: it decodes them (fs/posix_acl.c
    ``posix_acl_from_xattr``: version 2, a 4-byte header then 8-byte entries, USER/GROUP
    ids must be valid, any other tag is EINVAL; no entries means no ACL) and encodes them
    again (``posix_acl_to_xattr``), where the id of an entry other than USER/GROUP is
    always ACL_UNDEFINED_ID.
    """
    if len(raw) < 4:
        raise CorruptedError(f"{where}: POSIX ACL too short", errno=errno.EINVAL)
    if int.from_bytes(raw[:4], "little") != 2:
        raise UnsupportedError(f"{where}: POSIX ACL version {int.from_bytes(raw[:4], 'little')}")
    if (len(raw) - 4) % 8:
        raise CorruptedError(f"{where}: POSIX ACL size {len(raw)}", errno=errno.EINVAL)
    if len(raw) == 4:
        return None
    out = bytearray(raw[:4])
    for pos in range(4, len(raw), 8):
        tag = int.from_bytes(raw[pos:pos + 2], "little")
        ident = int.from_bytes(raw[pos + 4:pos + 8], "little")
        if tag in (_ACL_USER, _ACL_GROUP):
            if ident == 0xFFFFFFFF:   # make_kuid/make_kgid: (uid_t)-1 is never valid
                raise CorruptedError(f"{where}: POSIX ACL entry with id -1", errno=errno.EINVAL)
        elif tag in (_ACL_USER_OBJ, _ACL_GROUP_OBJ, _ACL_MASK, _ACL_OTHER):
            ident = 0xFFFFFFFF
        else:
            raise CorruptedError(f"{where}: POSIX ACL tag 0x{tag:x}", errno=errno.EINVAL)
        out += raw[pos:pos + 4] + ident.to_bytes(4, "little")
    return bytes(out)


# ---------------------------------------------------------------------------- the xattr name filter
EROFS_XATTR_FILTER_SEED = 0x25BBE08F
EROFS_XATTR_FILTER_BITS = 32
_P1, _P2, _P3, _P4, _P5 = 2654435761, 2246822519, 3266489917, 668265263, 374761393
_M32 = 0xFFFFFFFF


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (32 - r))) & _M32


def xxh32(data: bytes, seed: int) -> int:
    """XXH32 (the kernel's lib/xxhash.c ``xxh32``), for the xattr name filter."""
    n, i = len(data), 0
    seed &= _M32
    if n >= 16:
        v = [(seed + _P1 + _P2) & _M32, (seed + _P2) & _M32, seed, (seed - _P1) & _M32]
        while i + 16 <= n:
            for k in range(4):
                lane = int.from_bytes(data[i + 4 * k:i + 4 * k + 4], "little")
                v[k] = (_rotl((v[k] + lane * _P2) & _M32, 13) * _P1) & _M32
            i += 16
        h = (_rotl(v[0], 1) + _rotl(v[1], 7) + _rotl(v[2], 12) + _rotl(v[3], 18)) & _M32
    else:
        h = (seed + _P5) & _M32
    h = (h + n) & _M32
    while i + 4 <= n:
        h = (_rotl((h + int.from_bytes(data[i:i + 4], "little") * _P3) & _M32, 17) * _P4) & _M32
        i += 4
    while i < n:
        h = (_rotl((h + data[i] * _P5) & _M32, 11) * _P1) & _M32
        i += 1
    h ^= h >> 15
    h = (h * _P2) & _M32
    h ^= h >> 13
    h = (h * _P3) & _M32
    return h ^ (h >> 16)


def handler_split(name: bytes) -> tuple[int, bytes] | None:
    """(xattr handler index, name after its prefix) as the VFS picks the handler; None: no handler."""
    for index, prefix in L.XATTR_PREFIXES.items():
        if index in (L.EROFS_XATTR_INDEX_POSIX_ACL_ACCESS, L.EROFS_XATTR_INDEX_POSIX_ACL_DEFAULT):
            if name == prefix:
                return index, b""
        elif name.startswith(prefix):
            return index, name[len(prefix):]
    return None


def filtered_out(sb: Superblock, name_filter: int, name: bytes) -> bool:
    """True when the inode's name filter says ``name`` is absent (fs/erofs/xattr.c erofs_getxattr).

    A set bit means "no xattr hashing here": the kernel answers ENODATA without looking,
    whatever the entries hold.  Only with the XATTR_FILTER feature and a zero reserved byte.
    """
    if not sb.has_compat(L.EROFS_FEATURE_COMPAT_XATTR_FILTER) or sb.xattr_filter_reserved:
        return False
    split = handler_split(name)
    if split is None:
        return False
    index, suffix = split
    bit = xxh32(suffix, EROFS_XATTR_FILTER_SEED + index) & (EROFS_XATTR_FILTER_BITS - 1)
    return bool(name_filter & (1 << bit))


def name_filter(inode: Inode, read_meta: ReadMeta) -> int:
    """The inode's ``h_name_filter`` (0 without xattrs)."""
    if inode.xattr_isize < L.XATTR_IBODY_HEADER.size:
        return 0
    return int.from_bytes(read_meta(inode.iloc + inode.inode_isize, 4, inode.in_metabox)[:4], "little")


XATTR_NAME_CAPS = b"security.capability"
_VFS_CAP_REVISION_2, _VFS_CAP_REVISION_3, _VFS_CAP_FLAGS_EFFECTIVE = 0x02000000, 0x03000000, 0x000001


def capability_value(raw: bytes, where: str) -> bytes:
    """security.capability as getxattr(2) returns it in the initial user namespace.

    The capability LSM answers, not the filesystem (security/commoncap.c
    ``cap_inode_getsecurity``): only a 20-byte v2 or a 24-byte v3 header is valid (the
    revision compared with just the effective flag masked off), else EINVAL; a v3 whose
    root id is 0 comes back as v2, an unmappable root id (-1) is EOVERFLOW.
    """
    magic = int.from_bytes(raw[:4], "little") if len(raw) >= 4 else 0
    sansflags = magic & ~_VFS_CAP_FLAGS_EFFECTIVE
    if len(raw) == 20 and sansflags == _VFS_CAP_REVISION_2:
        return raw
    if len(raw) == 24 and sansflags == _VFS_CAP_REVISION_3:
        root = int.from_bytes(raw[20:24], "little")
        if root == 0xFFFFFFFF:
            raise CorruptedError(f"{where}: capability root id -1", errno=errno.EOVERFLOW)
        if root:
            return raw
        return (_VFS_CAP_REVISION_2 | (magic & _VFS_CAP_FLAGS_EFFECTIVE)).to_bytes(4, "little") + raw[4:20]
    raise CorruptedError(f"{where}: invalid security.capability ({len(raw)} bytes)", errno=errno.EINVAL)
