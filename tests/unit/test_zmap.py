"""Compressed indexes -> extents (erofs/zmap.py) on hand-built metadata bytes."""

from __future__ import annotations

import struct
from types import SimpleNamespace

import pytest

from erofs_mount.errors import CorruptedError, ErofsMountError, UnsupportedError
from erofs_mount.erofs import decompress as D
from erofs_mount.erofs import zext
from erofs_mount.erofs import zmap as Z

BS = 4096
PLAIN, HEAD1, NONHEAD, HEAD2 = 0, 1, 2, 3


def inode(size: int, layout: int = Z.EROFS_INODE_COMPRESSED_FULL, nid: int = 77):
    return SimpleNamespace(nid=nid, size=size, datalayout=layout, iloc=0, inode_isize=32, xattr_isize=0,
                           in_metabox=False)


def header(advise: int = 0, algs: int = 0, clusterbits: int = 0, first: int = 0) -> bytes:
    return struct.pack("<IHBB", first, advise, algs, clusterbits)


def head(t: int, clusterofs: int, blkaddr: int, partial: bool = False) -> bytes:
    return struct.pack("<HHI", t | (Z.Z_EROFS_LI_PARTIAL_REF if partial else 0), clusterofs, blkaddr)


def nonhead(d0: int, d1: int) -> bytes:
    return struct.pack("<HHHH", NONHEAD, 0, d0, d1)


def zmap(meta: bytes, ino, algs: int = 0b1, big: bool = True) -> Z.ZMap:
    return Z.ZMap(ino, 12, algs, big, lambda pos, n: meta[pos:pos + n])


def legacy(hdr: bytes, records: list[bytes], tail: bytes = b"") -> bytes:
    # inode (32 bytes) | map header at 32 | 8 reserved | lcluster indexes from 48 | inline tail
    return bytes(32) + hdr + bytes(8) + b"".join(records) + tail


# ---------------------------------------------------------------------------- full (legacy) indexes

SIZE = 3 * BS + 100
RECORDS = [head(HEAD1, 0, 10), nonhead(1, 1), head(HEAD1, 100, 11), nonhead(1, 1)]


def test_legacy_extents_are_whole():
    zm = zmap(legacy(header(), RECORDS), inode(SIZE))
    first = zm.map(0)
    assert (first.la, first.llen, first.kind, first.pa, first.plen, first.alg) == \
        (0, 2 * BS + 100, Z.ZEXT_MAPPED, 10 * BS, BS, D.Z_EROFS_COMPRESSION_LZ4)
    assert zm.map(2 * BS + 99) == first              # head lcluster with endoff < clusterofs: look back
    assert zm.map(BS + 5) == first                   # NONHEAD: delta[0]
    second = zm.map(2 * BS + 100)
    assert (second.la, second.llen, second.pa) == (2 * BS + 100, SIZE - 2 * BS - 100, 11 * BS)
    assert zm.map(SIZE - 1) == second
    with pytest.raises(ValueError):
        zm.map(SIZE)


def test_partial_ref_and_plain_and_head2():
    recs = [head(PLAIN, 0, 10), head(HEAD2, 0, 11, partial=True), head(HEAD1, 0, 12)]
    zm = zmap(legacy(header(algs=0x30), recs), inode(3 * BS), algs=0b1001)
    assert zm.map(0).alg == D.Z_EROFS_COMPRESSION_SHIFTED
    e = zm.map(BS)
    assert (e.alg, e.partial) == (D.Z_EROFS_COMPRESSION_ZSTD, True)
    assert zm.map(2 * BS).alg == D.Z_EROFS_COMPRESSION_LZ4


def test_interlaced_advise():
    zm = zmap(legacy(header(Z.Z_EROFS_ADVISE_INTERLACED_PCLUSTER), [head(PLAIN, 0, 3)]), inode(1000))
    assert zm.map(5).alg == D.Z_EROFS_COMPRESSION_INTERLACED


def test_big_pcluster_cblkcnt():
    recs = [head(HEAD1, 0, 20), nonhead(Z.Z_EROFS_LI_D0_CBLKCNT | 3, 2), nonhead(2, 1), head(HEAD1, 0, 23)]
    zm = zmap(legacy(header(Z.Z_EROFS_ADVISE_BIG_PCLUSTER_1), recs), inode(4 * BS))
    e = zm.map(2 * BS + 1)
    assert (e.la, e.llen, e.pa, e.plen) == (0, 3 * BS, 20 * BS, 3 * BS)
    assert zm.map(3 * BS).plen == BS


def test_cblkcnt_without_big_pcluster_is_corruption():
    recs = [head(HEAD1, 0, 20), nonhead(Z.Z_EROFS_LI_D0_CBLKCNT | 3, 1)]
    zm = zmap(legacy(header(), recs), inode(2 * BS))
    with pytest.raises(CorruptedError):
        zm.map(BS)


def test_big_pcluster_advise_needs_the_superblock_feature():
    with pytest.raises(CorruptedError):
        zmap(legacy(header(Z.Z_EROFS_ADVISE_BIG_PCLUSTER_1), RECORDS), inode(SIZE), big=False)


@pytest.mark.parametrize("records", [
    [head(HEAD1, 0, 10), nonhead(0, 1)],              # lookback distance 0
    [head(HEAD1, 0, 10), nonhead(2, 1)],              # lookback before lcluster 0
    [nonhead(1, 1), nonhead(1, 1)],                   # no head at all
    [head(HEAD1, 4096, 10), nonhead(1, 1)],           # clusterofs beyond the lcluster
    [head(HEAD1, 5, 10), head(HEAD1, 7, 11)],         # lcluster 0 must start at 0
])
def test_bogus_indexes_are_corruption(records):
    zm = zmap(legacy(header(), records), inode(2 * BS - 1))
    with pytest.raises(CorruptedError) as ei:
        for la in (0, BS, 2 * BS - 2):
            zm.map(la)
    assert "inode 77" in str(ei.value)


def test_index_past_the_end_of_the_metadata():
    meta = legacy(header(), RECORDS[:2])       # the file needs 4 indexes
    with pytest.raises(ErofsMountError):
        zmap(meta, inode(SIZE)).map(SIZE - 1)


def test_unknown_head_algorithm():
    with pytest.raises(UnsupportedError):
        zmap(legacy(header(algs=0x05), RECORDS), inode(SIZE))
    with pytest.raises(UnsupportedError):
        zmap(legacy(header(algs=0x70), RECORDS), inode(SIZE))


def test_algorithm_not_in_the_superblock_set():
    zm = zmap(legacy(header(algs=0x01), RECORDS), inode(SIZE), algs=0b1)
    with pytest.raises(CorruptedError):
        zm.map(0)


def test_ztailpacking_inline_pcluster():
    hdr = struct.pack("<HHHBB", 0, 37, Z.Z_EROFS_ADVISE_INLINE_PCLUSTER, 0, 0)
    meta = legacy(hdr, RECORDS, tail=b"T" * 37)
    zm = zmap(meta, inode(SIZE))
    tail = zm.map(SIZE - 1)
    assert (tail.kind, tail.pa, tail.plen, tail.la) == (Z.ZEXT_META, 48 + 4 * 8, 37, 2 * BS + 100)
    assert zm.map(0).kind == Z.ZEXT_MAPPED


def test_fragment_tail_offset_has_64_bits_in_full_indexes():
    hdr = struct.pack("<IHBB", 0x1234, Z.Z_EROFS_ADVISE_FRAGMENT_PCLUSTER, 0, 0)
    recs = RECORDS[:2] + [head(HEAD1, 100, 0x5), nonhead(1, 1)]
    zm = zmap(legacy(hdr, recs), inode(SIZE))
    tail = zm.map(SIZE - 1)
    assert (tail.kind, tail.la, tail.llen, tail.fragmentoff) == \
        (Z.ZEXT_FRAGMENT, 2 * BS + 100, SIZE - 2 * BS - 100, (5 << 32) | 0x1234)
    assert zm.map(0).kind == Z.ZEXT_MAPPED


def test_all_fragments_header():
    hdr = struct.pack("<Q", (1 << 63) | 0xABCDE)
    zm = zmap(bytes(32) + hdr, inode(12345))
    e = zm.map(999)
    assert (e.kind, e.la, e.llen, e.fragmentoff) == (Z.ZEXT_FRAGMENT, 0, 12345, 0xABCDE)


def test_oversized_extent_is_refused():
    recs = [head(HEAD1, 0, 1)] + [nonhead(1, 1) for i in range(1, 3100)] + [head(HEAD1, 0, 2)]
    zm = zmap(legacy(header(), recs), inode(3101 * BS))
    with pytest.raises(CorruptedError) as ei:
        zm.map(0)
    assert ei.value.errno == 95    # EOPNOTSUPP, as the kernel's z_erofs_map_blocks_iter


# ---------------------------------------------------------------------------- compacted indexes

def compact_pack(entries: list[tuple[int, int]], base: int, vcnt: int, amort: int) -> bytes:
    size = vcnt * amort
    encodebits = (size - 4) * 8 // vcnt
    bits = 0
    for j, (t, lo) in enumerate(entries):
        bits |= ((t << 12) | lo) << (encodebits * j)
    return bits.to_bytes(size - 4, "little") + struct.pack("<I", base)


def test_compacted_2b_and_4b():
    # header at 32 -> ebase 40 -> (32 - 40 % 32) / 4 = 6 initial 4B lclusters (3 packs), then 2B packs of 16
    ino = inode(6 * BS + 16 * BS + 2 * BS, Z.EROFS_INODE_COMPRESSED_COMPACT)
    init = [compact_pack([(HEAD1, 0), (HEAD1, 0)], 99, 2, 4),         # lclusters 0,1 -> blocks 100, 101
            compact_pack([(HEAD1, 0), (NONHEAD, 1)], 101, 2, 4),      # 2 -> 102 (2 lclusters)
            compact_pack([(HEAD1, 0), (NONHEAD, 1)], 102, 2, 4)]      # 4 -> 103; 5 NONHEAD (last: delta1=1)
    two = [(HEAD1, 0), (NONHEAD, 1), (NONHEAD, 2), (HEAD1, 50)] + [(HEAD1, 0)] * 11 + [(NONHEAD, 1)]
    packs = b"".join(init) + compact_pack(two, 199, 16, 2) + compact_pack([(HEAD1, 0), (NONHEAD, 1)], 300, 2, 4)
    meta = bytes(32) + header(Z.Z_EROFS_ADVISE_COMPACTED_2B) + packs
    zm = zmap(meta, ino)
    assert (zm.map(0).pa, zm.map(BS).pa) == (100 * BS, 101 * BS)
    e = zm.map(3 * BS)
    assert (e.la, e.llen, e.pa) == (2 * BS, 2 * BS, 102 * BS)
    e = zm.map(5 * BS + 7)
    assert (e.la, e.llen, e.pa) == (4 * BS, 2 * BS, 103 * BS)
    e = zm.map(8 * BS + 10)          # 2B pack: head at lcluster 6, NONHEADs 7, 8, next head 9 at +50
    assert (e.la, e.llen, e.pa) == (6 * BS, 3 * BS + 50, 200 * BS)
    e = zm.map(9 * BS + 50)
    assert (e.la, e.llen, e.pa) == (9 * BS + 50, BS - 50, 201 * BS)
    e = zm.map(21 * BS)              # last of the 2B pack: NONHEAD whose delta[0] comes from its neighbour
    assert (e.la, e.pa) == (20 * BS, 212 * BS)
    e = zm.map(23 * BS)              # trailing 4B pack
    assert (e.la, e.llen, e.pa) == (22 * BS, 2 * BS, 301 * BS)


def test_compact_big_pcluster_heads_must_agree():
    ino = inode(2 * BS, Z.EROFS_INODE_COMPRESSED_COMPACT)
    with pytest.raises(CorruptedError):
        zmap(bytes(32) + header(Z.Z_EROFS_ADVISE_BIG_PCLUSTER_1) + bytes(64), ino)


# ---------------------------------------------------------------------------- 48-bit encoded extents

def ext_header(nexts: int, recsz: int, advise: int = 0, clusterbits: int = 0) -> bytes:
    shift = {4: 0, 8: 1, 16: 2, 32: 3}[recsz]
    return struct.pack("<IHH", nexts & 0xFFFFFFFF, Z.Z_EROFS_ADVISE_EXTENTS | (shift << 1) | advise,
                       (nexts >> 32) | (clusterbits << 8))


def ext_meta(hdr: bytes, recsz: int, body: bytes) -> bytes:
    start = (40 + recsz - 1) // recsz * recsz    # records are aligned to their size after the header
    return bytes(32) + hdr + bytes(start - 40) + body


def test_extents_sorted_records_16():
    fmt = (D.Z_EROFS_COMPRESSION_ZSTD + 1) << zext.Z_EROFS_EXTENT_PLEN_FMT_BIT
    recs = [struct.pack("<IIII", fmt | 1000, 5000, 0, 0),
            struct.pack("<IIII", 0, 0, 0, 30000),                                   # a hole
            struct.pack("<IIII", fmt | zext.Z_EROFS_EXTENT_PLEN_PARTIAL | 777, 6000, 1, 40000)]
    zm = zmap(ext_meta(ext_header(3, 16), 16, b"".join(recs)), inode(50000), algs=0b1000)
    e = zm.map(29999)
    assert (e.la, e.llen, e.pa, e.plen, e.alg, e.partial) == (0, 30000, 5000, 1000, D.Z_EROFS_COMPRESSION_ZSTD, False)
    assert zm.map(35000).kind == Z.ZEXT_HOLE
    e = zm.map(49999)
    assert (e.la, e.llen, e.pa, e.plen, e.partial) == (40000, 10000, (1 << 32) | 6000, 777, True)


def test_extents_record_past_the_end_of_the_file_is_corruption():
    recs = [struct.pack("<IIII", 100, 0, 0, 0), struct.pack("<IIII", 100, 0, 0, 30000)]
    zm = zmap(ext_meta(ext_header(2, 16), 16, b"".join(recs)), inode(20000))
    with pytest.raises(CorruptedError):
        zm.map(100)


def test_extents_per_lcluster_4_byte_records_accumulate():
    plens = [4096, 1000, 0, 2000]
    meta = bytes(32) + ext_header(4, 4, clusterbits=1) + struct.pack("<Q", 8192) + \
        b"".join(struct.pack("<I", p) for p in plens)
    zm = zmap(meta, inode(4 * 8192 - 10))
    got = [(e.la, e.llen, e.pa, e.plen, e.kind) for e in (zm.map(i * 8192) for i in range(4))]
    assert got == [(0, 8192, 8192, 4096, Z.ZEXT_MAPPED), (8192, 8192, 12288, 1000, Z.ZEXT_MAPPED),
                   (16384, 8192, 0, 0, Z.ZEXT_HOLE), (24576, 8182, 13288, 2000, Z.ZEXT_MAPPED)]
    assert all(e.alg == D.Z_EROFS_COMPRESSION_SHIFTED for e in (zm.map(0), zm.map(8192)))


def test_extents_fragment_tail():
    recs = [struct.pack("<II", (1 << 28) | 4096, 3), struct.pack("<II", 0x55, 0x2)]
    meta = bytes(32) + ext_header(2, 8, Z.Z_EROFS_ADVISE_FRAGMENT_PCLUSTER) + b"".join(recs)
    zm = zmap(meta, inode(6000))
    e = zm.map(5000)
    assert (e.kind, e.la, e.llen, e.fragmentoff) == (Z.ZEXT_FRAGMENT, 4096, 6000 - 4096, (2 << 32) | 0x55)


def test_long_lookback_chain_stops_at_the_size_limit():
    # a crafted chain of NONHEAD lclusters each pointing one back: refused before walking it all
    n = 100_000
    recs = [head(HEAD1, 0, 1)] + [nonhead(1, 1)] * (n - 1)
    calls = []
    meta = legacy(header(), recs)

    def read_meta(pos, size):
        calls.append(pos)
        return meta[pos:pos + size]

    zm = Z.ZMap(inode(n * BS), 12, 1, True, read_meta)
    with pytest.raises(CorruptedError) as ei:
        zm.map((n - 1) * BS)
    assert ei.value.errno == 95
    assert len(calls) < 400     # 4 KiB windows: ~3100 lclusters at most were looked at


def test_extents_4_byte_records_across_checkpoints():
    n = 3000
    plens = [(i % 7 + 1) * 100 for i in range(n)]
    meta = ext_meta(ext_header(n, 4), 4, struct.pack("<Q", 1 << 20) + struct.pack(f"<{n}I", *plens))
    zm = zmap(meta, inode(n * BS))
    for k in (0, 1, 1023, 1024, 1025, 2047, 2999, 5, 2500):
        e = zm.map(k * BS + 7)
        assert (e.la, e.pa, e.plen) == (k * BS, (1 << 20) + sum(plens[:k]), plens[k])
