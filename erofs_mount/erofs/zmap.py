"""Compressed inode indexes -> extents (kernel ``fs/erofs/zmap.c``, erofs-utils ``lib/zmap.c``).

Three on-disk forms follow the inode (and its xattrs), after the 8-byte
``z_erofs_map_header`` at ``round_up(iloc + inode_isize + xattr_isize, 8)``:

* ``COMPRESSED_FULL`` ("legacy"): one 8-byte ``z_erofs_lcluster_index`` per logical
  cluster, starting 8 bytes after the header;
* ``COMPRESSED_COMPACT``: packs of 2 lclusters in 8 bytes (compacted_4b) or 16 in 32
  bytes (compacted_2b), each pack ending with a le32 base block address; an initial run
  of 4b packs aligns the 2b region to 32 bytes, 4b packs follow it;
* ``COMPRESSED_FULL`` with ``Z_EROFS_ADVISE_EXTENTS`` (48-bit layout): ``z_erofs_extent``
  records of 4/8/16/32 bytes (per lcluster, or sorted by logical start), mapped by
  ``zext.ExtentRecords``.

Unlike the kernel, which maps only up to the end of the requested lcluster and decodes
partially, ``ZMap.map`` always returns the *whole* extent (up to the next HEAD lcluster,
like ``z_erofs_get_extent_decompressedlen``), so a pcluster is decoded once and cached.
``ZMap.map_run`` maps a whole range: the first extent with ``map``, the ones after it with
``zrun.compact_run`` / ``full_run`` (lcluster indexes), which give exactly what ``map`` would.
Every loop moves by at least one lcluster, so corrupted deltas end in ``CorruptedError``.
"""

from __future__ import annotations

import errno
from collections.abc import Callable

from ..errors import CorruptedError, ShortReadError, UnsupportedError
from . import decompress as D
from .zext import ExtentRecords
from .zindex import (  # noqa: F401  (re-exported: the layouts, advise flags, lcluster types, index flags, kinds)
    EROFS_INODE_COMPRESSED_COMPACT,
    EROFS_INODE_COMPRESSED_FULL,
    Z_EROFS_ADVISE_BIG_PCLUSTER_1,
    Z_EROFS_ADVISE_BIG_PCLUSTER_2,
    Z_EROFS_ADVISE_COMPACTED_2B,
    Z_EROFS_ADVISE_EXTENTS,
    Z_EROFS_ADVISE_FRAGMENT_PCLUSTER,
    Z_EROFS_ADVISE_INLINE_PCLUSTER,
    Z_EROFS_ADVISE_INTERLACED_PCLUSTER,
    Z_EROFS_FRAGMENT_INODE_BIT,
    Z_EROFS_LCLUSTER_TYPE_HEAD1,
    Z_EROFS_LCLUSTER_TYPE_HEAD2,
    Z_EROFS_LCLUSTER_TYPE_NONHEAD,
    Z_EROFS_LCLUSTER_TYPE_PLAIN,
    Z_EROFS_LI_D0_CBLKCNT,
    Z_EROFS_LI_PARTIAL_REF,
    ZEXT_FRAGMENT,
    ZEXT_HOLE,
    ZEXT_MAPPED,
    ZEXT_META,
    CompactPack,
    ZExtent,
    full_lcluster,
)
from .zindex import LCluster as _LC
from .zrun import compact_run, full_run

_LC_MEMO = 512      # decoded lclusters kept per inode
_PACK_MEMO = 64     # decoded compacted packs kept per inode


class ZMap:
    """Extent mapper of one compressed inode; ``read_meta(pos, n)`` reads its metadata space."""

    def __init__(self, inode, blkszbits: int, available_algs: int, big_pcluster_sb: bool,
                 read_meta: Callable[[int, int], bytes]) -> None:
        self.nid = inode.nid
        self.size = inode.size
        self.layout = inode.datalayout
        self.blkszbits = blkszbits
        self.available_algs = available_algs
        self._read_meta = read_meta
        self._windows: dict[int, bytes] = {}
        # decoded lclusters and compacted packs: pure functions of immutable metadata, so a
        # bounded memo changes no result (failures are never memoized and raise again)
        self._lcs: dict[int, _LC] = {}
        self._packs: dict[int, CompactPack] = {}
        self._last_pack: tuple[int, int, CompactPack | None] = (0, 0, None)
        self._fast_kw: dict | None = None
        self.header_pos = (inode.iloc + inode.inode_isize + inode.xattr_isize + 7) & ~7
        h = self._meta(self.header_pos, 8)
        self.all_fragments = False
        self.fragmentoff = 0
        self.idata_size = 0
        self.idataoff = 0
        self.tail_headlcn = -1
        self.extents = -1
        self.algs = (0, 0)
        if h[7] >> Z_EROFS_FRAGMENT_INODE_BIT:     # whole file in the packed inode
            self.all_fragments = True
            self.advise = Z_EROFS_ADVISE_FRAGMENT_PCLUSTER
            self.fragmentoff = int.from_bytes(h, "little") ^ (1 << 63)
            self.lclusterbits = blkszbits
            return
        self.advise = int.from_bytes(h[4:6], "little")
        self.lclusterbits = blkszbits + (h[7] & 15)
        if self.layout == EROFS_INODE_COMPRESSED_FULL and self.advise & Z_EROFS_ADVISE_EXTENTS:
            self.extents = int.from_bytes(h[0:4], "little") | (int.from_bytes(h[6:8], "little") << 32)
            self.recsz = 4 << ((self.advise >> 1) & 3)
            self.ext_pos = (self.header_pos + 8 + self.recsz - 1) // self.recsz * self.recsz
            self._records = ExtentRecords(self)
            return
        self.algs = (h[6] & 15, h[6] >> 4)
        for n, a in enumerate(self.algs):
            if a >= D.Z_EROFS_COMPRESSION_MAX:
                raise UnsupportedError(f"inode {self.nid}: unknown HEAD{n + 1} compression algorithm id {a}")
        if self.advise & Z_EROFS_ADVISE_FRAGMENT_PCLUSTER:
            self.fragmentoff = int.from_bytes(h[0:4], "little")
        elif self.advise & Z_EROFS_ADVISE_INLINE_PCLUSTER:
            self.idata_size = int.from_bytes(h[2:4], "little")
        big = self.advise & (Z_EROFS_ADVISE_BIG_PCLUSTER_1 | Z_EROFS_ADVISE_BIG_PCLUSTER_2)
        if big and not big_pcluster_sb:
            raise CorruptedError(f"inode {self.nid}: big pcluster without the superblock feature")
        if self.layout == EROFS_INODE_COMPRESSED_COMPACT and big and \
                big != (Z_EROFS_ADVISE_BIG_PCLUSTER_1 | Z_EROFS_ADVISE_BIG_PCLUSTER_2):
            raise CorruptedError(f"inode {self.nid}: inconsistent big pcluster head1/2 of compact indexes")
        if self.layout == EROFS_INODE_COMPRESSED_COMPACT and self.lclusterbits > 14:
            raise CorruptedError(f"inode {self.nid}: lcluster size 2^{self.lclusterbits} too large")
        if self.lclusterbits > 30:
            raise CorruptedError(f"inode {self.nid}: lcluster size 2^{self.lclusterbits} too large")
        self.nlclusters = -(-self.size >> self.lclusterbits) if self.size else 0
        # compacted layout (z_erofs_load_compact_lcluster): the initial 4b run, then the 2b region
        totalidx = -(-self.size >> blkszbits)     # erofs_iblks()
        self._c_ebase = self.header_pos + 8
        self._c4_initial = ((32 - self._c_ebase % 32) // 4) & 7
        self._c2b = 0
        if self.advise & Z_EROFS_ADVISE_COMPACTED_2B and self._c4_initial < totalidx:
            self._c2b = (totalidx - self._c4_initial) // 16 * 16
        if self.size and (self.idata_size or self.advise & Z_EROFS_ADVISE_FRAGMENT_PCLUSTER):
            self._find_tail()

    # ------------------------------------------------------------------ metadata bytes
    def _meta(self, pos: int, n: int) -> bytes:
        win = pos >> 12
        data = self._windows.get(win)
        if data is None:
            if len(self._windows) >= 8:     # bounded: 32 KiB of index bytes per inode
                self._windows.clear()
            data = self._windows[win] = self._read_meta(win << 12, 4096)
        off = pos & 4095
        out = data[off:off + n]
        if len(out) < n and len(data) == 4096:
            out += self._meta((win + 1) << 12, n - len(out))
        if len(out) < n:
            raise ShortReadError(f"inode {self.nid}: compression index at byte {pos} past the end of the metadata")
        return out

    def _corrupt(self, what: str, la: int | None = None) -> CorruptedError:
        where = f" at logical offset {la}" if la is not None else ""
        return CorruptedError(f"inode {self.nid}: {what}{where}")

    # ------------------------------------------------------------------ lcluster indexes
    def _load(self, lcn: int) -> _LC:
        m = self._lcs.get(lcn)
        if m is not None:
            return m
        if not 0 <= lcn < self.nlclusters:
            raise self._corrupt(f"lcluster {lcn} out of range ({self.nlclusters} lclusters)")
        m = self._load_compact(lcn) if self.layout == EROFS_INODE_COMPRESSED_COMPACT \
            else self._load_full(lcn)
        if m.type != Z_EROFS_LCLUSTER_TYPE_NONHEAD and m.clusterofs >= 1 << self.lclusterbits:
            raise self._corrupt(f"clusterofs {m.clusterofs} of lcluster {lcn} beyond the lcluster")
        if len(self._lcs) >= _LC_MEMO:
            self._lcs.clear()
        self._lcs[lcn] = m
        return m

    def _load_full(self, lcn: int) -> _LC:
        pos = self.header_pos + 16 + lcn * 8
        big = bool(self.advise & (Z_EROFS_ADVISE_BIG_PCLUSTER_1 | Z_EROFS_ADVISE_BIG_PCLUSTER_2))
        return full_lcluster(self._meta(pos, 8), pos, lcn, self.lclusterbits, big, self.nid)

    def _load_compact(self, lcn: int) -> _LC:
        pack, i = self._pack_at(lcn)
        return pack.lcluster(i, lcn, self.lclusterbits, bool(self.advise & Z_EROFS_ADVISE_BIG_PCLUSTER_1), self.nid)

    def _pack_at(self, lcn: int) -> tuple[CompactPack, int]:
        """The decoded compacted pack holding lcluster ``lcn``, and its position in the pack."""
        first, last, pack = self._last_pack     # packs never straddle the 4b/2b regions
        if first <= lcn < last:
            return pack, lcn - first
        lcb = self.lclusterbits
        pos, rel, amort = self._c_ebase, lcn, 4
        if lcn >= self._c4_initial:
            pos += self._c4_initial * 4
            rel -= self._c4_initial
            if rel < self._c2b:
                amort = 2
            else:
                pos += self._c2b * 2
                rel -= self._c2b
        pos += rel * amort
        if amort == 4:
            vcnt = 2
        elif lcb <= 12:
            vcnt = 16
        else:
            raise UnsupportedError(f"inode {self.nid}: compacted_2b indexes with 2^{lcb}-byte lclusters")
        packsize = vcnt * amort
        start = pos - pos % packsize
        pack = self._packs.get(start)
        if pack is None:
            pack = CompactPack(self._meta(start, packsize), start, vcnt, lcb,
                               bool(self.advise & Z_EROFS_ADVISE_BIG_PCLUSTER_1))
            if len(self._packs) >= _PACK_MEMO:
                self._packs.clear()
            self._packs[start] = pack
        i = (pos - start) // amort
        self._last_pack = (lcn - i, lcn - i + vcnt, pack)
        return pack, i

    # ------------------------------------------------------------------ lcluster extents
    def _head_of(self, la: int) -> tuple[_LC, _LC]:
        """(initial lcluster, head lcluster) of the extent holding byte ``la``."""
        lcn = la >> self.lclusterbits
        m = self._load(lcn)
        endoff = la & ((1 << self.lclusterbits) - 1)
        if m.type != Z_EROFS_LCLUSTER_TYPE_NONHEAD:
            if endoff >= m.clusterofs:
                return m, m
            if lcn == 0:
                raise self._corrupt("invalid logical cluster 0", la)
            dist = 1
        else:
            dist = m.delta0
        cur = m
        while True:     # z_erofs_extent_lookback: lcn strictly decreases
            if dist == 0 or dist > cur.lcn:
                raise self._corrupt(f"bogus lookback distance {dist} at lcluster {cur.lcn}", la)
            if (lcn - cur.lcn + dist) << self.lclusterbits > D.Z_EROFS_PCLUSTER_MAX_DSIZE + (1 << self.lclusterbits):
                raise self._too_large(la)
            cur = self._load(cur.lcn - dist)
            if cur.type != Z_EROFS_LCLUSTER_TYPE_NONHEAD:
                return m, cur
            dist = cur.delta0

    def _find_tail(self) -> None:
        """EROFS_GET_BLOCKS_FINDTAIL: where the inline pcluster / the fragment starts."""
        init, head = self._head_of(self.size - 1)
        if self.idata_size:
            self.idataoff = init.nextpackoff
        self.tail_headlcn = head.lcn
        if self.advise & Z_EROFS_ADVISE_FRAGMENT_PCLUSTER and self.layout == EROFS_INODE_COMPRESSED_FULL:
            self.fragmentoff |= head.pblk << 32

    def _extent_end(self, head: _LC, la: int) -> int:
        lcb = self.lclusterbits
        lcn = head.lcn + 1
        while True:     # lcn strictly increases, and at most 12 MiB worth of lclusters
            if lcn << lcb >= self.size:
                return self.size
            if (lcn - head.lcn - 1) << lcb > D.Z_EROFS_PCLUSTER_MAX_DSIZE:
                raise self._too_large(la)
            m = self._load(lcn)
            if m.type != Z_EROFS_LCLUSTER_TYPE_NONHEAD:
                return min((lcn << lcb) + m.clusterofs, self.size)
            lcn += m.delta1 or 1    # pre-1.0 mkfs could write delta[1] = 0

    def _compressed_blocks(self, head: _LC) -> int:
        big1 = self.advise & Z_EROFS_ADVISE_BIG_PCLUSTER_1
        big2 = self.advise & Z_EROFS_ADVISE_BIG_PCLUSTER_2
        if head.type == Z_EROFS_LCLUSTER_TYPE_HEAD1:
            big = big1
        else:
            big = big2
        if not big or (head.lcn + 1) << self.lclusterbits >= self.size:
            return 1
        m = self._load(head.lcn + 1)
        if m.type == Z_EROFS_LCLUSTER_TYPE_NONHEAD:
            if m.delta0 != 1:
                raise self._corrupt(f"bogus CBLKCNT at lcluster {m.lcn}")
            return m.cblkcnt or 1
        return 1

    def map(self, la: int) -> ZExtent:
        """The whole extent holding logical byte ``la`` (0 <= la < i_size)."""
        if not 0 <= la < self.size:
            raise ValueError(f"offset {la} outside the file")
        if self.all_fragments:
            return ZExtent(0, self.size, ZEXT_FRAGMENT, fragmentoff=self.fragmentoff)
        if self.extents >= 0:
            return self._records.map(la)
        lcb = self.lclusterbits
        _, head = self._head_of(la)
        m_la = (head.lcn << lcb) | head.clusterofs
        end = self._extent_end(head, la)
        if not m_la <= la < end:
            raise self._corrupt(f"inconsistent indexes: extent [{m_la}, {end})", la)
        llen = end - m_la
        if head.lcn == self.tail_headlcn and self.idata_size:
            pa, plen, kind = self.idataoff, self.idata_size, ZEXT_META
            if (pa & ((1 << self.blkszbits) - 1)) + plen > 1 << self.blkszbits:
                raise self._corrupt(f"invalid tail-packing pcluster size {plen}", la)
        elif head.lcn == self.tail_headlcn and self.advise & Z_EROFS_ADVISE_FRAGMENT_PCLUSTER:
            return ZExtent(m_la, llen, ZEXT_FRAGMENT, fragmentoff=self.fragmentoff)
        else:
            pa = head.pblk << self.blkszbits
            plen = self._compressed_blocks(head) << self.blkszbits
            kind = ZEXT_MAPPED
        if head.type == Z_EROFS_LCLUSTER_TYPE_PLAIN:
            if llen > plen:
                raise self._corrupt(f"uncompressed extent of {llen} bytes in a {plen}-byte pcluster", la)
            alg = D.Z_EROFS_COMPRESSION_INTERLACED if self.advise & Z_EROFS_ADVISE_INTERLACED_PCLUSTER \
                else D.Z_EROFS_COMPRESSION_SHIFTED
        else:
            alg = self.algs[1] if head.type == Z_EROFS_LCLUSTER_TYPE_HEAD2 else self.algs[0]
            if not self.available_algs >> alg & 1:
                raise self._corrupt(f"inconsistent algorithm {D.algorithm_name(alg)}", la)
        return self._checked(ZExtent(m_la, llen, kind, pa, plen, alg, head.partialref), la)

    def map_run(self, la: int, end: int, out: list[ZExtent]) -> None:
        """Append the extents covering ``[la, end)`` to ``out`` in order: exactly what ``map`` gives at
        ``la`` and then at each extent's end.  A failure is raised as ``map`` raises it, with the
        extents before it already appended."""
        end = min(end, self.size)
        fast = not self.all_fragments and self.extents < 0
        first = True
        while la < end:
            if fast and not first:
                la = self._run_fast(la, end, out)
                if la >= end:
                    return
            first = False
            ext = self.map(la)
            if not ext.la <= la < ext.la + ext.llen:    # map() guarantees it; never loop on it
                raise CorruptedError(f"inode {self.nid}: empty extent at logical offset {la}")
            out.append(ext)
            la = ext.la + ext.llen

    def _run_fast(self, la: int, end: int, out: list[ZExtent]) -> int:
        """``map_run``'s fast path (``zrun.compact_run`` / ``full_run``): returns where it stopped."""
        kw = self._fast_kw
        if kw is None:
            kw = self._fast_kw = self._fast_params()
        if self.layout == EROFS_INODE_COMPRESSED_COMPACT:
            return compact_run(self._pack_at, la, end, out, **kw)
        pos = self.header_pos + 16
        return full_run(lambda lcn, n: self._meta(pos + lcn * 8, n * 8), la, end, out, **kw)

    def _fast_params(self) -> dict:
        adv = self.advise
        kw = {"lclusterbits": self.lclusterbits, "blkszbits": self.blkszbits, "size": self.size,
              "tail_headlcn": self.tail_headlcn if self.idata_size or adv & Z_EROFS_ADVISE_FRAGMENT_PCLUSTER else -1,
              "algs": self.algs, "available_algs": self.available_algs,
              "plain_alg": D.Z_EROFS_COMPRESSION_INTERLACED if adv & Z_EROFS_ADVISE_INTERLACED_PCLUSTER
              else D.Z_EROFS_COMPRESSION_SHIFTED}
        if self.layout == EROFS_INODE_COMPRESSED_COMPACT:
            kw["big"] = bool(adv & Z_EROFS_ADVISE_BIG_PCLUSTER_1)     # compacted: HEAD1 and HEAD2 agree
        else:
            kw["big1"] = bool(adv & Z_EROFS_ADVISE_BIG_PCLUSTER_1)
            kw["big2"] = bool(adv & Z_EROFS_ADVISE_BIG_PCLUSTER_2)
        return kw

    def _checked(self, ext: ZExtent, la: int) -> ZExtent:
        if ext.plen > D.Z_EROFS_PCLUSTER_MAX_SIZE or ext.llen > D.Z_EROFS_PCLUSTER_MAX_DSIZE:
            raise self._too_large(la, f" ({ext.plen} -> {ext.llen} bytes)")
        return ext

    def _too_large(self, la: int, what: str = "") -> CorruptedError:
        # z_erofs_map_blocks_iter: beyond Z_EROFS_PCLUSTER_MAX_SIZE / _MAX_DSIZE is EOPNOTSUPP
        return CorruptedError(f"inode {self.nid}: extent{what} exceeds the pcluster limits "
                              f"(1 MiB encoded, 12 MiB decoded) at logical offset {la}", errno=errno.EOPNOTSUPP)
