"""Directory blocks: decode dirents, iterate from a byte position, binary-search lookup.

A directory's data is a sequence of blocks; each block starts with ``struct
erofs_dirent`` records followed by the names they point at (``nameoff``).  The
first record's ``nameoff`` is the size of the record array.  Names are sorted
bytewise across the whole directory, so lookup is a binary search over blocks,
then within a block (kernel ``fs/erofs/namei.c``).  Validation follows
``fs/erofs/dir.c`` ``erofs_fill_dentries``: a name running past the block or
longer than 255 bytes is corruption (EUCLEAN).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import CorruptedError
from . import layout as L


@dataclass(frozen=True, slots=True)
class DirEntry:
    name: bytes
    nid: int
    file_type: int
    next_pos: int  # directory byte position of the following entry (resume cookie)


def parse_block(block: bytes, dir_nid: int, block_pos: int) -> list[tuple[bytes, int, int]]:
    """All ``(name, nid, file_type)`` records of one directory block.

    ``block`` is the block's valid bytes (``min(block size, i_size - block_pos)``).
    """
    maxsize = len(block)
    if maxsize < L.DIRENT.size:
        raise CorruptedError(f"directory nid {dir_nid}: block at {block_pos} too short ({maxsize} bytes)")
    nameoff0 = L.DIRENT.unpack_from(block, 0)[1]
    if nameoff0 < L.DIRENT.size or nameoff0 >= maxsize or nameoff0 % L.DIRENT.size:
        raise CorruptedError(f"directory nid {dir_nid}: invalid de[0].nameoff {nameoff0} at {block_pos}")
    count = nameoff0 // L.DIRENT.size
    recs = [L.DIRENT.unpack_from(block, i * L.DIRENT.size) for i in range(count)]
    out = []
    for i, (nid, nameoff, ftype, _r) in enumerate(recs):
        if i + 1 < count:
            end = recs[i + 1][1]
        else:
            z = block.find(b"\0", nameoff, maxsize)
            end = maxsize if z < 0 else z
        namelen = end - nameoff
        if nameoff < nameoff0 or nameoff > maxsize or namelen <= 0 or end > maxsize or namelen > L.EROFS_NAME_LEN:
            raise CorruptedError(f"directory nid {dir_nid}: bogus dirent {i} (nameoff {nameoff}, length "
                                 f"{namelen}) in block at {block_pos}")
        out.append((block[nameoff:end], nid, ftype))
    return out


def check_name(name: bytes, dir_nid: int) -> None:
    """A name that could escape a directory is corruption, never a path to follow."""
    if b"/" in name or b"\0" in name or (name in (b".", b"..")):
        raise CorruptedError(f"directory nid {dir_nid}: invalid entry name {name!r}")


def entries_from(block: bytes, dir_nid: int, block_pos: int, start_off: int) -> list[DirEntry]:
    """Entries of one block whose record offset is >= ``start_off`` (rounded up to a record)."""
    recs = parse_block(block, dir_nid, block_pos)
    first = -(-start_off // L.DIRENT.size)
    out = []
    for i in range(first, len(recs)):
        name, nid, ftype = recs[i]
        nxt = block_pos + (i + 1) * L.DIRENT.size if i + 1 < len(recs) else block_pos + len(block)
        out.append(DirEntry(name=name, nid=nid, file_type=ftype, next_pos=nxt))
    return out


def search_block(recs: list[tuple[bytes, int, int]], name: bytes) -> tuple[int, int] | None:
    """Binary search one block's records; ``(nid, file_type)`` or None."""
    lo, hi = 0, len(recs) - 1
    while lo <= hi:
        mid = (lo + hi) // 2
        cur = recs[mid][0]
        if cur == name:
            return recs[mid][1], recs[mid][2]
        if cur < name:
            lo = mid + 1
        else:
            hi = mid - 1
    return None
