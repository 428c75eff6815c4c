"""Uncompressed data layouts -> extents (the kernel's ``erofs_map_blocks``).

* ``FLAT_PLAIN``: contiguous blocks from ``startblk`` (a null address reads as zeros);
* ``FLAT_INLINE``: the same for all but the last partial block, whose bytes follow the
  inode (and its xattrs) in the metadata block ("tail packing");
* ``CHUNK_BASED``: per chunk of ``1 << chunkbits`` bytes, a 4-byte block map entry or an
  8-byte ``erofs_inode_chunk_index`` (device id + 32/48-bit start block); a null entry
  is a hole.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..errors import CorruptedError, UnsupportedError
from . import layout as L
from .inode import Inode
from .superblock import Superblock

EROFS_MAP_MAPPED = 0x1  # data on a device at (device, pa)
EROFS_MAP_META = 0x2    # data in the metadata area (inline tail)


@dataclass(frozen=True, slots=True)
class Extent:
    la: int        # logical start
    llen: int      # logical length (never past i_size)
    pa: int        # physical byte position (device or metadata space)
    device: int    # 0 = primary; for chunk indexes the on-disk device id
    flags: int     # 0 = hole (zeros)


def map_blocks(sb: Superblock, inode: Inode, la: int, read_meta: Callable[[int, int, bool], bytes],
               device_id_mask: int = 0) -> Extent:
    """The extent containing logical offset ``la`` (< i_size) of an uncompressed inode."""
    size = inode.size
    bs = sb.block_size
    if inode.datalayout in (L.EROFS_INODE_FLAT_PLAIN, L.EROFS_INODE_FLAT_INLINE):
        tailpacking = inode.datalayout == L.EROFS_INODE_FLAT_INLINE
        if not tailpacking and inode.startblk == L.EROFS_NULL_ADDR:
            return Extent(la, size - la, 0, 0, 0)
        nblocks = -(-size // bs)
        pos = (nblocks - int(tailpacking)) * bs
        if la < pos:
            return Extent(la, pos - la, inode.startblk * bs + la, 0, EROFS_MAP_MAPPED)
        tail_pa = inode.data_start + (la % bs)
        llen = size - la
        # inline data must sit in the inode's own metadata block
        if (inode.data_start % bs) + (size - pos) > bs:
            raise CorruptedError(f"inode {inode.nid}: inline data crosses a block boundary")
        return Extent(la, llen, tail_pa, 0, EROFS_MAP_META)
    if inode.datalayout != L.EROFS_INODE_CHUNK_BASED:
        raise UnsupportedError(f"inode {inode.nid}: data layout {inode.datalayout} is not uncompressed")
    unit = L.CHUNK_INDEX.size if inode.chunkformat & L.EROFS_CHUNK_FORMAT_INDEXES else L.EROFS_BLOCK_MAP_ENTRY_SIZE
    chunknr = la >> inode.chunkbits
    pos = -(-inode.data_start // unit) * unit + unit * chunknr
    raw = read_meta(pos, unit, inode.in_metabox)
    if len(raw) < unit:
        raise CorruptedError(f"inode {inode.nid}: chunk index {chunknr} truncated")
    cla = chunknr << inode.chunkbits
    llen = min(1 << inode.chunkbits, size - cla)
    if unit == L.CHUNK_INDEX.size:
        hi, device_id, lo = L.CHUNK_INDEX.unpack(raw)
        addrmask = (1 << 48) - 1 if inode.chunkformat & L.EROFS_CHUNK_FORMAT_48BIT else (1 << 32) - 1
        startblk = ((hi << 32) | lo) & addrmask
        if not ((startblk ^ L.EROFS_NULL_ADDR) & addrmask):
            return Extent(cla, llen, 0, 0, 0)
        return Extent(cla, llen, startblk * bs, device_id & device_id_mask, EROFS_MAP_MAPPED)
    startblk = int.from_bytes(raw, "little")
    if startblk == 0xFFFFFFFF:
        return Extent(cla, llen, 0, 0, 0)
    return Extent(cla, llen, startblk * bs, 0, EROFS_MAP_MAPPED)
