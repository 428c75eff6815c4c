"""Compacted pack decoding (erofs/zindex.py) against a literal per-lcluster walk.

``CompactPack`` tabulates the kernel's in-pack walks (``z_erofs_load_compact_lcluster``:
the backward block count of a HEAD's pblk, the forward NONHEAD run for delta[1]) once
per pack.  The reference below walks them per lcluster, step by step, as the kernel
does; both must agree on every lcluster of arbitrary (mostly corrupt) packs, including
where the big-pcluster walk reports corruption.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from erofs_mount.errors import CorruptedError
from erofs_mount.erofs.zindex import CompactPack, Z_EROFS_LI_D0_CBLKCNT as CBLK

NONHEAD = 2


def reference(raw: bytes, vcnt: int, lcb: int, big: bool, i: int) -> tuple | str:
    packsize = len(raw)
    encodebits = (packsize - 4) * 8 // vcnt
    lobits = max(lcb, 12)
    bits = int.from_bytes(raw[:-4], "little")
    base = int.from_bytes(raw[-4:], "little")

    def decode(j):
        v = bits >> (encodebits * j)
        return v & ((1 << lobits) - 1), (v >> lobits) & 3

    lo, t = decode(i)
    if t == NONHEAD:
        d1, j = 0, i
        while j < vcnt:
            jlo, jt = decode(j)
            if jt != NONHEAD:
                break
            d1 += 1
            j += 1
        else:
            if not jlo & CBLK:
                d1 += jlo - 1
        d1 = max(d1, 0)
        if lo & CBLK:
            if not big:
                return "corrupt"
            return (t, 1 << lcb, 0, 1, d1, lo & ~CBLK)
        if i + 1 != vcnt:
            return (t, 1 << lcb, 0, lo, d1, 0)
        plo, pt = decode(i - 1)
        plo = 0 if pt != NONHEAD else (1 if plo & CBLK else plo)
        return (t, 1 << lcb, 0, plo + 1, d1, 0)
    nblk = 0 if big else 1
    j = i
    for _ in range(4 * vcnt):       # the walk strictly decreases j
        if j <= 0:
            break
        j -= 1
        jlo, jt = decode(j)
        if not big:
            if jt == NONHEAD:
                j -= jlo
            if j >= 0:
                nblk += 1
        elif jt == NONHEAD:
            if jlo & CBLK:
                j -= 1
                nblk += jlo & ~CBLK
            elif jlo <= 1:
                return "corrupt"
            else:
                j -= jlo - 2
        else:
            nblk += 1
    return (t, lo, base + nblk, 0, 0, 0)


def decoded(pack: CompactPack, i: int, lcb: int, big: bool) -> tuple | str:
    try:
        m = pack.lcluster(i, 1000 + i, lcb, big, 7)
    except CorruptedError:
        return "corrupt"
    if m.type == NONHEAD:
        return (m.type, m.clusterofs, 0, m.delta0, m.delta1, m.cblkcnt)
    return (m.type, m.clusterofs, m.pblk, 0, 0, 0)


def small_lo(lobits):
    # mostly small deltas (walks that stay inside the pack), some CBLKCNT, some anything
    return st.one_of(st.integers(0, 18), st.integers(0, 18).map(lambda x: x | CBLK),
                     st.integers(0, (1 << lobits) - 1))


@st.composite
def packs(draw):
    vcnt = draw(st.sampled_from([2, 16]))
    lcb = 12 if vcnt == 16 else draw(st.sampled_from([12, 13, 14]))
    lobits = max(lcb, 12)
    amort = 2 if vcnt == 16 else 4
    encodebits = (vcnt * amort - 4) * 8 // vcnt
    bits = 0
    for j in range(vcnt):
        t = draw(st.sampled_from([0, 1, 2, 2, 2, 3]))
        v = draw(small_lo(lobits)) | (t << lobits)
        bits |= (v & ((1 << encodebits) - 1)) << (encodebits * j)
    base = draw(st.integers(0, 2**32 - 1))
    raw = bits.to_bytes(vcnt * amort - 4, "little") + base.to_bytes(4, "little")
    return raw, vcnt, lcb, draw(st.booleans())


@settings(max_examples=400, deadline=None)
@given(packs())
def test_compact_pack_matches_the_per_lcluster_walk(p):
    raw, vcnt, lcb, big = p
    pack = CompactPack(raw, 64, vcnt, lcb, big)
    assert pack.end == 64 + len(raw)
    for i in range(vcnt):
        assert decoded(pack, i, lcb, big) == reference(raw, vcnt, lcb, big, i), i


@pytest.mark.parametrize("big", [False, True])
def test_a_valid_big_pcluster_pack(big):
    # HEAD1 at 0 (3 blocks via CBLKCNT at 1), NONHEAD 2..3 back to 0, HEAD1 at 4 ... 16 lclusters
    lobits, encodebits = 12, 14
    ents = [(1, 0), (2, CBLK | 3), (2, 2), (2, 3), (1, 100)] + [(1, 200 + j) for j in range(11)]
    if not big:
        ents = [(1, 0), (2, 1), (2, 2), (2, 3), (1, 100)] + [(1, 200 + j) for j in range(11)]
    bits = 0
    for j, (t, lo) in enumerate(ents):
        bits |= (lo | t << lobits) << (encodebits * j)
    raw = bits.to_bytes(28, "little") + (1000).to_bytes(4, "little")
    pack = CompactPack(raw, 0, 16, 12, big)
    for i in range(16):
        assert decoded(pack, i, 12, big) == reference(raw, 16, 12, big, i)
    m = pack.lcluster(4, 4, 12, big, 1)
    assert m.pblk == (1000 + 3 if big else 1000 + 2)
