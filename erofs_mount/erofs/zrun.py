"""Sequential extent walks for ``ZMap.map_run``: extent after extent over the decoded indexes.

From an extent's first byte (a HEAD lcluster whose clusterofs is that byte's offset), the next
extent's HEAD is the lcluster the previous walk ended on, so a read spanning many extents maps
them in one pass: ``compact_run`` over ``zindex.CompactPack`` tables (compacted 2b/4b indexes),
``full_run`` over raw 8-byte ``z_erofs_lcluster_index`` records (legacy indexes), neither making
an ``LCluster`` per step.  Both visit the same lclusters in the same order as the per-extent path
(``ZMap._head_of`` / ``_extent_end`` / ``_compressed_blocks``, after the kernel's
``fs/erofs/zmap.c``) and stop, appending nothing for that extent, wherever that path would raise
or do more; ``ZMap.map`` then produces that extent, or its exact error.

Pure: the callers hand in the index bytes / packs.
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import ErofsMountError
from .decompress import Z_EROFS_PCLUSTER_MAX_DSIZE, Z_EROFS_PCLUSTER_MAX_SIZE
from .zindex import (
    _CBLK,
    _LCLUSTER_INDEX,
    _NONHEAD,
    Z_EROFS_LCLUSTER_TYPE_HEAD1,
    Z_EROFS_LCLUSTER_TYPE_HEAD2,
    Z_EROFS_LI_PARTIAL_REF,
    ZEXT_MAPPED,
    CompactPack,
    ZExtent,
)


def _algorithm(t: int, llen: int, plen: int, algs: tuple[int, int], plain_alg: int, available_algs: int) -> int:
    """The extent's algorithm as ``ZMap.map`` takes it (HEAD1/HEAD2 from ``algs``, PLAIN: ``plain_alg``),
    or -1 where ``map`` would raise instead: an unavailable algorithm, a plain extent longer than its
    pcluster, an empty extent or one beyond the pcluster limits (``ZMap._checked``)."""
    if t == Z_EROFS_LCLUSTER_TYPE_HEAD2:
        alg = algs[1]
    elif t:
        alg = algs[0]
    else:
        if llen > plen:
            return -1
        alg = plain_alg
    if t and not available_algs >> alg & 1 or llen <= 0 or llen > Z_EROFS_PCLUSTER_MAX_DSIZE \
            or plen > Z_EROFS_PCLUSTER_MAX_SIZE:
        return -1
    return alg


def compact_run(pack_at: Callable[[int], tuple[CompactPack, int]], la: int, end: int, out: list[ZExtent], *,
                lclusterbits: int, blkszbits: int, size: int, big: bool, tail_headlcn: int, algs: tuple[int, int],
                available_algs: int, plain_alg: int) -> int:
    """``ZMap.map_run`` on compacted indexes while every extent is the plain case, walking the packs'
    decoded lists (``pack_at(lcn)``: the pack holding ``lcn`` and its index there) instead of making
    an ``LCluster`` per step; appends the extents to ``out`` and returns where it stopped.

    From an extent's first byte (a HEAD lcluster whose clusterofs is that byte's offset) ``ZMap.map``
    finds its head without looking back, walks forward like ``_extent_end`` and takes the block
    count like ``_compressed_blocks``.  This loop visits the same lclusters in the same order and
    stops, appending nothing for that extent, wherever ``map`` would raise or do more (the tail
    pcluster ``tail_headlcn``, a lookback, any corruption check), so ``map`` then gives that extent
    or its error.  ``big``: big pclusters (in compacted indexes HEAD1 and HEAD2 agree).
    """
    lcb = lclusterbits
    lcmask = (1 << lcb) - 1
    bbits = blkszbits
    tail = tail_headlcn
    maxd = Z_EROFS_PCLUSTER_MAX_DSIZE
    NONHEAD, CBLK = _NONHEAD, _CBLK
    first = last = -1       # lclusters [first, last) of the current pack
    los = types = blocks = d1s = None
    base = 0
    append = out.append
    make = tuple.__new__
    try:
        while la < end:
            h = la >> lcb
            if not first <= h < last:
                pack, i = pack_at(h)
                first, last = h - i, h - i + len(pack.los)
                los, types, base = pack.los, pack.types, pack.base
                blocks, d1s = pack.blocks or pack._blocks(), pack.d1 or pack._d1()
            i = h - first
            t = types[i]
            if t == NONHEAD or los[i] != la & lcmask or h == tail:
                return la
            nblk = blocks[i]
            if nblk is None:
                return la
            pa = (base + nblk) << bbits
            nb = 1
            lcn = h + 1
            while True:     # _extent_end
                if lcn << lcb >= size:
                    e = size
                    break
                if (lcn - h - 1) << lcb > maxd:
                    return la
                if not first <= lcn < last:
                    pack, j = pack_at(lcn)
                    first, last = lcn - j, lcn - j + len(pack.los)
                    los, types, base = pack.los, pack.types, pack.base
                    blocks, d1s = pack.blocks or pack._blocks(), pack.d1 or pack._d1()
                j = lcn - first
                lo = los[j]
                if types[j] == NONHEAD:
                    if lo & CBLK:
                        if not big:
                            return la
                        if lcn == h + 1:
                            nb = (lo & ~CBLK) or 1
                    elif big and lcn == h + 1:     # _compressed_blocks: delta[0] must be 1
                        if j + 1 != len(los):
                            d0 = lo
                        else:
                            d0 = 1 if types[j - 1] != NONHEAD else (2 if los[j - 1] & CBLK else los[j - 1] + 1)
                        if d0 != 1:
                            return la
                    lcn += d1s[j] or 1
                else:
                    if lo > lcmask or big and blocks[j] is None:
                        return la
                    e = min((lcn << lcb) + lo, size)
                    break
            llen = e - la
            plen = nb << bbits
            alg = _algorithm(t, llen, plen, algs, plain_alg, available_algs)
            if alg < 0:
                return la
            append(make(ZExtent, (la, llen, ZEXT_MAPPED, pa, plen, alg, False, 0)))
            la = e
    except ErofsMountError:     # map() meets the same failure and raises it
        pass
    return la


def full_run(records: Callable[[int, int], bytes], la: int, end: int, out: list[ZExtent], *, lclusterbits: int,
             blkszbits: int, size: int, big1: bool, big2: bool, tail_headlcn: int, algs: tuple[int, int],
             available_algs: int, plain_alg: int) -> int:
    """``compact_run`` for full (``COMPRESSED_FULL``, 8 bytes per lcluster) indexes: ``records(lcn, n)``
    gives the ``n`` index records from lcluster ``lcn`` on (or raises).  The same steps as
    ``full_lcluster``, ``ZMap._extent_end`` and ``ZMap._compressed_blocks``, stepping aside wherever
    they would raise or do more; records it reads but ``map`` would not change nothing (they are only
    read ahead, and a failing read ahead makes it stop)."""
    lcb = lclusterbits
    lcmask = (1 << lcb) - 1
    bbits = blkszbits
    tail = tail_headlcn
    nlc = -(-size >> lcb)
    big = big1 or big2
    maxd = Z_EROFS_PCLUSTER_MAX_DSIZE
    NONHEAD, HEAD1, CBLK, PREF = _NONHEAD, Z_EROFS_LCLUSTER_TYPE_HEAD1, _CBLK, \
        Z_EROFS_LI_PARTIAL_REF
    unpack = _LCLUSTER_INDEX.unpack_from
    make = tuple.__new__
    append = out.append
    first = last = -1   # records [first, last) in buf
    buf = b""
    try:
        while la < end:
            h = la >> lcb
            if not first <= h < last:
                first, last = h, min(h + 256, nlc)
                buf = records(first, last - first)
            adv, co, pblk = unpack(buf, (h - first) * 8)
            t = adv & 3
            if t == NONHEAD or co != la & lcmask or h == tail:
                return la
            bigh = big1 if t == HEAD1 else big2
            nb = 1
            lcn = h + 1
            while True:     # _extent_end
                if lcn << lcb >= size:
                    e = size
                    break
                if (lcn - h - 1) << lcb > maxd:
                    return la
                if not first <= lcn < last:
                    first, last = lcn, min(lcn + 256, nlc)
                    buf = records(first, last - first)
                adv2, co2, u = unpack(buf, (lcn - first) * 8)
                if adv2 & 3 == NONHEAD:
                    d0 = u & 0xFFFF
                    cblk = 0
                    if d0 & CBLK:
                        if not big:
                            return la
                        cblk, d0 = d0 & ~CBLK, 1
                    if bigh and lcn == h + 1:   # _compressed_blocks
                        if d0 != 1:
                            return la
                        nb = cblk or 1
                    lcn += (u >> 16) or 1
                else:
                    if co2 > lcmask:
                        return la
                    e = min((lcn << lcb) + co2, size)
                    break
            llen = e - la
            plen = nb << bbits
            alg = _algorithm(t, llen, plen, algs, plain_alg, available_algs)
            if alg < 0:
                return la
            append(make(ZExtent, (la, llen, ZEXT_MAPPED, pblk << bbits, plen, alg, bool(adv & PREF), 0)))
            la = e
    except ErofsMountError:     # map() meets the same failure and raises it
        pass
    return la
