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


def entries_from(block: bytes, dir_nid: int, block_pos: int, start_off: int,
                 recs: list[tuple[bytes, int, int]] | None = None) -> list[DirEntry]:
    """Entries of one block whose record offset is >= ``start_off`` (rounded up to a record);
    ``recs``: the block's ``parse_block`` records if the caller already has them."""
    if recs is None:
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


# ---------------------------------------------------------------------------- lookup, the kernel's way
# fs/erofs/namei.c (erofs_namei, erofs_find_target_block, find_target_dirent, erofs_dirnamecmp) searches
# the raw blocks without the readdir validation: on-disk names compare as C strings (a NUL ends
# them), nameoffs are taken modulo the block size, and both binary searches skip the prefix already
# known to match on both sides.  On a sorted directory this is a plain binary search; on a damaged
# one it decides what is found, so it is mirrored here step by step rather than approximated.

def _nameoff(block: bytes, i: int, bs: int) -> int:
    return int.from_bytes(block[i * L.DIRENT.size + 8:i * L.DIRENT.size + 10], "little") & (bs - 1)


def _dirnamecmp(query: bytes, block: bytes, start: int, end: int, matched: int) -> tuple[int, int]:
    """(<0 / 0 / >0, new matched prefix length): ``query`` against the on-disk name at [start, end)."""
    i = matched
    while start + i < end and block[start + i] != 0:
        q = query[i] if i < len(query) else 0
        if q != block[start + i]:
            return (1 if q > block[start + i] else -1), i
        i += 1
    return (0 if i >= len(query) else 1), i


def _dirent_at(block: bytes, i: int) -> tuple[int, int]:
    nid, _nameoff, ftype, _r = L.DIRENT.unpack_from(block, i * L.DIRENT.size)
    return nid, ftype


def lookup_blocks(nblocks: int, block_at, name: bytes, bs: int, dir_nid: int) -> tuple[int, int] | None:
    """``(nid, file_type)`` of ``name`` or None; ``block_at(i)`` gives block i padded with zeros to ``bs``."""
    head, back = 0, nblocks - 1
    startprfx = endprfx = 0
    candidate = None
    while head <= back:
        mid = head + (back - head) // 2
        block = block_at(mid)
        nameoff = _nameoff(block, 0, bs)
        ndirents = nameoff // L.DIRENT.size
        if not ndirents:
            raise CorruptedError(f"directory nid {dir_nid}: corrupted directory block {mid}")
        end = bs if ndirents == 1 else _nameoff(block, 1, bs)
        diff, matched = _dirnamecmp(name, block, nameoff, end, min(startprfx, endprfx))
        if diff == 0:
            return _dirent_at(block, 0)
        if diff > 0:
            head, startprfx, candidate = mid + 1, matched, (block, ndirents)
        else:
            back, endprfx = mid - 1, matched
    if candidate is None:
        return None
    block, ndirents = candidate
    # within the block: the first entry was compared already
    head, back = 1, ndirents - 1
    startprfx = endprfx = 0
    while head <= back:
        mid = head + (back - head) // 2
        start = _nameoff(block, mid, bs)
        end = bs if mid >= ndirents - 1 else _nameoff(block, mid + 1, bs)
        diff, matched = _dirnamecmp(name, block, start, end, min(startprfx, endprfx))
        if diff == 0:
            return _dirent_at(block, mid)
        if diff > 0:
            head, startprfx = mid + 1, matched
        else:
            back, endprfx = mid - 1, matched
    return None
