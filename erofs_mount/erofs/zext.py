"""The 48-bit layout's ``z_erofs_extent`` records -> extents (kernel ``fs/erofs/zmap.c``
``z_erofs_map_blocks_ext``, erofs-utils ``lib/zmap.c``).

A ``COMPRESSED_FULL`` inode with ``Z_EROFS_ADVISE_EXTENTS`` keeps records of ``recsz`` bytes
(4 << ((h_advise >> 1) & 3)) from ``ext_pos``, the first multiple of ``recsz`` at least 8 bytes
after the map header:

* ``recsz`` 4 or 8: one record per lcluster.  An 8-byte record holds ``plen`` and the low 32
  bits of the physical start.  A 4-byte record holds only ``plen``: the pclusters lie back to
  back after a le64 base address (the first 8 bytes at ``ext_pos``), so record k starts at the
  base plus the plens of the records before it.
* ``recsz`` 16 or 32: records sorted by logical start (``extent_record``), found by binary
  search; before the first record the file is a hole.

``plen`` carries the algorithm (``fmt - 1``; 0: stored, shifted or interlaced) above
``Z_EROFS_EXTENT_PLEN_FMT_BIT`` and the partial-reference flag; a zero length is a hole; the
last record of a fragment inode names its fragment offset instead.
"""

from __future__ import annotations

import struct

from ..errors import UnsupportedError
from . import decompress as D
from .zindex import (
    Z_EROFS_ADVISE_FRAGMENT_PCLUSTER,
    Z_EROFS_ADVISE_INTERLACED_PCLUSTER,
    ZEXT_FRAGMENT,
    ZEXT_HOLE,
    ZEXT_MAPPED,
    ZExtent,
    extent_record,
)

Z_EROFS_EXTENT_PLEN_PARTIAL = 1 << 27
Z_EROFS_EXTENT_PLEN_FMT_BIT = 28
Z_EROFS_EXTENT_PLEN_MASK = (D.Z_EROFS_PCLUSTER_MAX_SIZE << 1) - 1

PA_CHUNK = 1024     # 4-byte records: a prefix sum of the plens is kept every PA_CHUNK records


class ExtentRecords:
    """The extent records of one inode, read through its ``ZMap`` (header fields, metadata window,
    error messages and pcluster limits)."""

    def __init__(self, zm) -> None:
        self.zm = zm
        self._checkpoints: list[int] = []      # recsz 4: pa of records 0, PA_CHUNK, 2 * PA_CHUNK ...
        self._last = (-1, 0)                   # recsz 4: (k, pa of record k) of the previous lookup

    # ------------------------------------------------------------------ 4-byte records: pa by prefix sums
    def pa_of(self, k: int) -> int:
        """The pa of 4-byte record k: the base + the plens before it.  From the nearest checkpoint,
        or from the previous lookup when that is nearer (a sequential read sums one record)."""
        cps = self._checkpoints
        if not cps:
            cps.append(int.from_bytes(self.zm._meta(self.zm.ext_pos, 8), "little"))
        j = k // PA_CHUNK
        while len(cps) <= j:
            cps.append(cps[-1] + self._plen_sum((len(cps) - 1) * PA_CHUNK, PA_CHUNK))
        last_k, last_pa = self._last
        if j * PA_CHUNK <= last_k <= k:
            pa = last_pa + self._plen_sum(last_k, k - last_k)
        else:
            pa = cps[j] + self._plen_sum(j * PA_CHUNK, k - j * PA_CHUNK)
        self._last = (k, pa)
        return pa

    def _plen_sum(self, first: int, count: int) -> int:
        if not count:
            return 0
        raw = self.zm._meta(self.zm.ext_pos + 8 + first * 4, count * 4)
        return sum(p & Z_EROFS_EXTENT_PLEN_MASK for p in struct.unpack(f"<{count}I", raw))

    # ------------------------------------------------------------------ lookups
    def record(self, i: int) -> tuple[int, int, int]:
        """(lstart, plen, pstart) of a 16/32-byte record."""
        zm = self.zm
        return extent_record(zm._meta(zm.ext_pos + i * zm.recsz, min(zm.recsz, 20)))

    def map(self, la: int) -> ZExtent:
        """The extent holding logical byte ``la`` (0 <= la < i_size)."""
        zm = self.zm
        recsz = zm.recsz
        if recsz <= 8:
            lcb = zm.lclusterbits
            k = la >> lcb
            lstart = k << lcb
            lend = min(lstart + (1 << lcb), zm.size)
            last = lstart + (1 << lcb) >= zm.size
            if recsz == 4:
                plen = int.from_bytes(zm._meta(zm.ext_pos + 8 + k * 4, 4), "little")
                pa = self.pa_of(k)
            else:
                plen, pa = struct.unpack("<II", zm._meta(zm.ext_pos + k * 8, 8))
        else:
            n = zm.extents
            lo, hi = 0, n
            rec = None
            while lo < hi:      # the last record with lstart <= la
                mid = (lo + hi) // 2
                r = self.record(mid)
                if r[0] <= la:
                    rec, lo = (mid,) + r, mid + 1
                else:
                    hi = mid
            if rec is None:
                nxt = self.record(0)[0] if n else zm.size
                return ZExtent(la, min(nxt, zm.size) - la, ZEXT_HOLE)
            idx, lstart, plen, pa = rec
            last = idx + 1 >= n
            lend = zm.size if last else self.record(idx + 1)[0]
            if lend <= lstart or lend > zm.size:
                raise zm._corrupt(f"unsorted extent records {idx}/{idx + 1}", la)
        if not lstart <= la < lend:
            raise zm._corrupt("extent records do not cover the offset", la)
        llen = lend - lstart
        if last and zm.advise & Z_EROFS_ADVISE_FRAGMENT_PCLUSTER:
            frag = plen | ((pa << 32) if recsz > 4 else 0)
            return ZExtent(lstart, llen, ZEXT_FRAGMENT, fragmentoff=frag & ((1 << 64) - 1))
        if not plen & Z_EROFS_EXTENT_PLEN_MASK:
            return ZExtent(lstart, llen, ZEXT_HOLE)
        fmt = plen >> Z_EROFS_EXTENT_PLEN_FMT_BIT
        partial = bool(plen & Z_EROFS_EXTENT_PLEN_PARTIAL)
        plen &= Z_EROFS_EXTENT_PLEN_MASK
        if fmt:
            alg = fmt - 1
            if alg >= D.Z_EROFS_COMPRESSION_RUNTIME_MAX:
                raise UnsupportedError(f"inode {zm.nid}: unknown algorithm {alg} at logical offset {lstart}")
            if alg < D.Z_EROFS_COMPRESSION_MAX and not zm.available_algs >> alg & 1:
                raise zm._corrupt(f"inconsistent algorithm {D.algorithm_name(alg)}", la)
        elif zm.advise & Z_EROFS_ADVISE_INTERLACED_PCLUSTER and not pa & ((1 << zm.blkszbits) - 1):
            alg = D.Z_EROFS_COMPRESSION_INTERLACED
        else:
            alg = D.Z_EROFS_COMPRESSION_SHIFTED
        return zm._checked(ZExtent(lstart, llen, ZEXT_MAPPED, pa, plen, alg, partial), la)
