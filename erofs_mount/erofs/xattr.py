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

from collections.abc import Callable

from ..errors import CorruptedError
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
            raise CorruptedError(f"{where}: xattr long prefix {i} out of range")
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
    _filter, shared_count, _r = L.XATTR_IBODY_HEADER.unpack_from(hdr)
    header_sz = L.XATTR_IBODY_HEADER.size + 4 * shared_count
    if header_sz > inode.xattr_isize:
        raise CorruptedError(f"{where}: {shared_count} shared xattrs overflow the xattr body")
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
