"""Index records -> decoded lclusters (kernel ``fs/erofs/zmap.c``: ``z_erofs_load_full_lcluster``
and ``z_erofs_load_compact_lcluster``) and 48-bit ``z_erofs_extent`` records.

Pure and per record: ``zmap.ZMap`` finds the bytes, this module decodes them.

A compacted pack (2 lclusters in 8 bytes, or 16 in 32 bytes) is decoded once into a
``CompactPack``; the per-lcluster walks the kernel does inside a pack on every lookup (the
backward block count of a HEAD's ``pblk``, the forward run of NONHEADs for ``delta[1]``)
are tabulated for the whole pack by recurrences that visit the same positions in the same
order, so every lcluster decodes to exactly what the walk would give, including the
corruption the big-pcluster walk reports.

``ZExtent`` (re-exported by ``zmap``) is the record ``ZMap.map`` and the sequential walks of
``zrun.py`` produce.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from ..errors import CorruptedError

# z_erofs_map_header (erofs_fs.h): the index forms and h_advise flags
EROFS_INODE_COMPRESSED_FULL = 1
EROFS_INODE_COMPRESSED_COMPACT = 3
Z_EROFS_ADVISE_COMPACTED_2B = 0x0001
Z_EROFS_ADVISE_EXTENTS = 0x0001          # the same bit, on COMPRESSED_FULL inodes (48-bit layout)
Z_EROFS_ADVISE_BIG_PCLUSTER_1 = 0x0002
Z_EROFS_ADVISE_BIG_PCLUSTER_2 = 0x0004
Z_EROFS_ADVISE_INLINE_PCLUSTER = 0x0008
Z_EROFS_ADVISE_INTERLACED_PCLUSTER = 0x0010
Z_EROFS_ADVISE_FRAGMENT_PCLUSTER = 0x0020
Z_EROFS_FRAGMENT_INODE_BIT = 7

Z_EROFS_LCLUSTER_TYPE_PLAIN = 0
Z_EROFS_LCLUSTER_TYPE_HEAD1 = 1
Z_EROFS_LCLUSTER_TYPE_NONHEAD = 2
Z_EROFS_LCLUSTER_TYPE_HEAD2 = 3
Z_EROFS_LI_PARTIAL_REF = 1 << 15
Z_EROFS_LI_D0_CBLKCNT = 1 << 11

# extent kinds
ZEXT_HOLE = 0       # zeros
ZEXT_MAPPED = 1     # pcluster at byte pa of the primary device
ZEXT_META = 2       # inline pcluster in metadata space (ztailpacking), at pa
ZEXT_FRAGMENT = 3   # bytes of the packed inode from fragmentoff


class ZExtent(NamedTuple):      # a tuple: built once per extent on the hot path, cheaper than a dataclass
    la: int                 # logical start of the extent
    llen: int               # its full decoded length (never past i_size)
    kind: int               # ZEXT_*
    pa: int = 0             # physical byte position (MAPPED: device 0; META: metadata space)
    plen: int = 0           # encoded length
    alg: int = -1           # decompress.Z_EROFS_COMPRESSION_* (incl. SHIFTED/INTERLACED)
    partial: bool = False   # PARTIAL_REF: the pcluster decodes to more than llen
    fragmentoff: int = 0    # FRAGMENT: offset of byte `la` in the packed inode


_LCLUSTER_INDEX = struct.Struct("<HHI")
_EXTENT = struct.Struct("<IIIII")
_NONHEAD = Z_EROFS_LCLUSTER_TYPE_NONHEAD
_CBLK = Z_EROFS_LI_D0_CBLKCNT


class LCluster:
    """One decoded lcluster (the kernel's z_erofs_maprecorder fields)."""
    __slots__ = ("cblkcnt", "clusterofs", "delta0", "delta1", "lcn", "nextpackoff", "partialref", "pblk", "type")

    def __init__(self, lcn: int) -> None:
        self.lcn = lcn
        self.type = 0
        self.clusterofs = 0
        self.pblk = 0
        self.delta0 = 0
        self.delta1 = 0
        self.cblkcnt = 0
        self.partialref = False
        self.nextpackoff = 0


def full_lcluster(raw: bytes, pos: int, lcn: int, lclusterbits: int, big_pcluster: bool, nid: int) -> LCluster:
    """An 8-byte ``z_erofs_lcluster_index`` (``raw``, read at byte ``pos``)."""
    advise, clusterofs, u = _LCLUSTER_INDEX.unpack(raw)
    m = LCluster(lcn)
    m.nextpackoff = pos + 8
    m.type = advise & 3
    if m.type == _NONHEAD:
        m.clusterofs = 1 << lclusterbits
        m.delta0, m.delta1 = u & 0xFFFF, u >> 16
        if m.delta0 & _CBLK:
            if not big_pcluster:
                raise CorruptedError(f"inode {nid}: CBLKCNT in lcluster {lcn} without big pclusters")
            m.cblkcnt = m.delta0 & ~_CBLK
            m.delta0 = 1
    else:
        m.partialref = bool(advise & Z_EROFS_LI_PARTIAL_REF)
        m.clusterofs = clusterofs
        m.pblk = u
    return m


def extent_record(raw: bytes) -> tuple[int, int, int]:
    """(lstart, plen, pstart) of a 16-byte or (the first 20 bytes of) a 32-byte ``z_erofs_extent``."""
    if len(raw) < 20:
        raw += bytes(4)     # no lstart_hi in 16-byte records
    plen, plo, phi, llo, lhi = _EXTENT.unpack(raw)
    return llo | (lhi << 32), plen, plo | (phi << 32)


class CompactPack:
    """One decoded compacted pack: ``vcnt`` (lo, type) pairs and the pack's base block address.

    ``blocks[i]`` is the block count the kernel's backward walk from lcluster ``i`` adds to
    the base (``None`` where that walk meets a plain ``delta[0] <= 1`` in a big-pcluster pack:
    EFSCORRUPTED); ``d1[i]`` is the lookahead ``delta[1]`` of a NONHEAD lcluster ``i``.
    """
    __slots__ = ("base", "big", "blocks", "d1", "end", "los", "types")

    def __init__(self, raw: bytes, start: int, vcnt: int, lclusterbits: int, big: bool) -> None:
        packsize = len(raw)
        self.end = start + packsize
        encodebits = (packsize - 4) * 8 // vcnt
        lobits = max(lclusterbits, 12)      # ilog2(Z_EROFS_LI_D0_CBLKCNT) + 1
        lomask = (1 << lobits) - 1
        bits = int.from_bytes(raw[:-4], "little")
        self.base = int.from_bytes(raw[-4:], "little")
        self.big = big
        if vcnt == 2:   # compacted_4b, the common pack of small files: the tables in closed form
            lo0, lo1 = bits & lomask, (bits >> encodebits) & lomask
            t0, t1 = (bits >> lobits) & 3, (bits >> (encodebits + lobits)) & 3
            self.los = [lo0, lo1]
            self.types = [t0, t1]
            if not big:     # _blocks: lcluster 0 counts unless it is a NONHEAD looking back before the pack
                self.blocks = [1, 1 + (t0 != _NONHEAD or lo0 == 0)]
            elif t0 != _NONHEAD:
                self.blocks = [0, 1]
            elif lo0 & _CBLK:
                self.blocks = [0, lo0 & ~_CBLK]
            else:
                self.blocks = [0, None if lo0 <= 1 else 0]
            if t1 == _NONHEAD:  # _d1: the run reaches the pack's end
                d = 1 + (0 if lo1 & _CBLK else lo1 - 1)
                self.d1 = [d + 1 if t0 == _NONHEAD else 0, d]   # d >= 0: lo1 >= 0, or 1 for a CBLKCNT
            else:
                self.d1 = [1 if t0 == _NONHEAD else 0, 0]
            return
        self.los = [(bits >> (encodebits * j)) & lomask for j in range(vcnt)]
        self.types = [(bits >> (encodebits * j + lobits)) & 3 for j in range(vcnt)]
        self.blocks: list[int | None] | None = None     # tabulated on first use
        self.d1: list[int] | None = None

    def _blocks(self) -> list[int | None]:
        los, types, vcnt = self.los, self.types, len(self.los)
        # c[p]: what the backward walk counts once it has stepped onto position p (decreasing
        # positions, so c[p] depends on smaller positions only)
        c: list[int | None] = [0] * vcnt
        if not self.big:
            for p in range(vcnt):
                q = p - los[p] if types[p] == _NONHEAD else p
                c[p] = (q >= 0) + (c[q - 1] if q > 0 else 0)
        else:
            for p in range(vcnt):
                lo = los[p]
                if types[p] != _NONHEAD:
                    rest = c[p - 1] if p > 0 else 0
                    c[p] = None if rest is None else 1 + rest
                elif lo & _CBLK:    # the CBLKCNT lcluster: its head is the one before it
                    rest = c[p - 2] if p > 1 else 0
                    c[p] = None if rest is None else (lo & ~_CBLK) + rest
                elif lo <= 1:       # a big pcluster never has a plain delta[0] of 1
                    c[p] = None
                else:
                    q = p - (lo - 2)
                    c[p] = c[q - 1] if q > 0 else 0
        first = 0 if self.big else 1
        self.blocks = blocks = [first] + [None if x is None else first + x for x in c[:-1]]
        return blocks

    def _d1(self) -> list[int]:
        # lookahead: the NONHEAD run from i; one reaching the pack's end adds the last
        # lcluster's stored delta[1] - 1 (unless that one holds a CBLKCNT)
        # (tail >= -1 and such a run is at least 1 long, so no entry is negative)
        los, types = self.los, self.types
        last = los[-1]
        tail = 0 if last & _CBLK else last - 1
        d1 = [0] * len(los)
        p = len(los) - 1
        run = 0
        while p >= 0 and types[p] == _NONHEAD:     # the run reaching the pack's end
            run += 1
            d1[p] = run + tail
            p -= 1
        run = 0
        while p >= 0:
            if types[p] == _NONHEAD:
                run += 1
                d1[p] = run
            else:
                run = 0
            p -= 1
        self.d1 = d1
        return d1

    def lcluster(self, i: int, lcn: int, lclusterbits: int, big: bool, nid: int) -> LCluster:
        los, types = self.los, self.types
        m = LCluster(lcn)
        m.nextpackoff = self.end
        lo = los[i]
        m.type = t = types[i]
        if t == _NONHEAD:
            m.clusterofs = 1 << lclusterbits
            m.delta1 = (self.d1 or self._d1())[i]
            if lo & _CBLK:
                if not big:
                    raise CorruptedError(f"inode {nid}: CBLKCNT in lcluster {lcn} without big pclusters")
                m.cblkcnt = lo & ~_CBLK
                m.delta0 = 1
            elif i + 1 != len(los):
                m.delta0 = lo
            else:   # last of the pack: its lo is delta[1]; delta[0] comes from the one before
                plo = los[i - 1]
                if types[i - 1] != _NONHEAD:
                    plo = 0
                elif plo & _CBLK:
                    plo = 1
                m.delta0 = plo + 1
            return m
        m.clusterofs = lo
        nblk = (self.blocks or self._blocks())[i]
        if nblk is None:
            raise CorruptedError(f"inode {nid}: plain delta[0] <= 1 in a big-pcluster pack at lcluster {lcn}")
        m.pblk = self.base + nblk
        return m

