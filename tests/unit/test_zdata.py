"""ZReader (erofs/zdata.py) over a small fake Image: extents -> bytes, fragments, cache, errors.

The fake stands in for the Image facade only (sb, read_raw, read_meta, read); the
reader under test is the real ZReader with the real ZMap and codecs.
"""

from __future__ import annotations

import errno
import struct
from types import SimpleNamespace

import lz4.block
import pytest

from erofs_mount.errors import CorruptedError, ShortReadError
from erofs_mount.erofs import zmap as Z
from erofs_mount.erofs.zdata import ZReader

BS = 4096
TEXT = b"".join(b"line %05d of some compressible text\n" % i for i in range(800))   # ~30 KB


def legacy_meta(records: list[bytes], advise: int = 0, first: int = 0) -> bytes:
    return bytes(32) + struct.pack("<IHBB", first, advise, 0, 0) + bytes(8) + b"".join(records)


def head(blk: int, t: int = 1, ofs: int = 0) -> bytes:
    return struct.pack("<HHI", t, ofs, blk)


def nonhead(d0: int, d1: int) -> bytes:
    return struct.pack("<HHHH", 2, 0, d0, d1)


class FakeImage:
    """Just enough of the Image facade for ZReader: one data device, per-inode metadata, a packed inode."""

    def __init__(self, device: bytes, metas: dict[int, bytes], sizes: dict[int, int], packed_nid: int = 0,
                 packed: bytes = b"") -> None:
        self.sb = SimpleNamespace(blkszbits=12, feature_incompat=0x1, available_compr_algs=0xFFFF, sb_size=128,
                                  packed_nid=packed_nid)
        self.device = device
        self.inodes = {nid: SimpleNamespace(nid=nid, size=size, datalayout=Z.EROFS_INODE_COMPRESSED_FULL,
                                            iloc=nid << 16, inode_isize=32, xattr_isize=0, in_metabox=False)
                       for nid, size in sizes.items()}
        self.meta = bytearray(max(self.inodes) + 1 << 16)
        for nid, m in metas.items():
            self.meta[nid << 16:(nid << 16) + len(m)] = m
        self.packed = packed
        self.zreader = ZReader(self)

    def read_raw(self, pos: int, n: int, device: int = 0) -> bytes:
        return self.device[pos:pos + n]

    def read_meta(self, pos: int, n: int, in_metabox: bool = False) -> bytes:
        return bytes(self.meta[pos:pos + n])

    def read(self, nid: int, off: int, n: int) -> bytes:
        if nid == self.sb.packed_nid and nid not in self.inodes:
            return self.packed[off:off + n]
        return self.zreader.read(self.inodes[nid], off, n)


def pcluster(data: bytes, blocks: int = 1) -> bytes:
    comp = lz4.block.compress(data, store_size=False, mode="high_compression")
    assert len(comp) <= blocks * BS
    return bytes(blocks * BS - len(comp)) + comp


def two_extent_image(**kw) -> FakeImage:
    # file 1 (nid 1): [0, 9000) in pcluster at block 1, [9000, 14000) in pcluster at block 2
    dev = bytes(BS) + pcluster(TEXT[:9000]) + pcluster(TEXT[9000:14000])
    meta = legacy_meta([head(1), nonhead(1, 1), head(2, ofs=9000 - 2 * BS), nonhead(1, 1)])
    return FakeImage(dev, {1: meta}, {1: 14000}, **kw)


def test_reads_across_extents_and_eof():
    img = two_extent_image()
    assert img.read(1, 0, 20000) == TEXT[:14000]
    assert img.read(1, 8990, 20) == TEXT[8990:9010]
    assert img.read(1, 13999, 100) == TEXT[13999:14000]
    assert img.read(1, 14000, 100) == b""


def test_extents_listing():
    img = two_extent_image()
    got = [(e.la, e.llen, e.pa, e.kind) for e in img.zreader.extents(img.inodes[1])]
    assert got == [(0, 9000, BS, Z.ZEXT_MAPPED), (9000, 5000, 2 * BS, Z.ZEXT_MAPPED)]


def test_cache_hits_misses_and_bounds():
    img = two_extent_image()
    zr = img.zreader
    for off in range(0, 14000, 1000):
        img.read(1, off, 1000)
    st = zr.stats()
    assert (st["misses"], st["bytes_decompressed"], st["cache_bytes"]) == (2, 14000, 14000)
    assert st["hits"] == 12        # 14 requests, each inside one extent
    zr.clear_cache()
    zr.cache_limit = 9500           # room for one decoded pcluster only
    assert img.read(1, 0, 14000) == TEXT[:14000]    # both extents consumed whole: decoded, not kept
    st = zr.stats()
    assert (st["misses"], st["cache_entries"], st["bytes_decompressed"]) == (4, 0, 28000)
    img.read(1, 0, 10)
    img.read(1, 9000, 10)
    assert img.read(1, 0, 10) == TEXT[:10]
    st = zr.stats()
    assert st["cache_bytes"] <= 9500 and st["evictions"] == 2 and st["misses"] == 7


def test_extents_read_whole_are_not_kept_partly_read_ones_are():
    # a request that covers an extent whole does not cache its pcluster (sequential readers never
    # come back for it); the extents at the request's edges are kept for the neighbouring requests
    img = two_extent_image()
    zr = img.zreader
    assert img.read(1, 0, 9000) == TEXT[:9000]
    assert zr.stats()["cache_entries"] == 0
    assert img.read(1, 100, 9000) == TEXT[100:9100]      # both partial: both kept
    st = zr.stats()
    assert st["cache_entries"] == 2 and st["misses"] == 3


def test_garbage_pcluster_names_inode_and_offset():
    img = two_extent_image()
    img.device = img.device[:2 * BS] + bytes(BS - 100) + bytes(range(100))
    assert img.read(1, 0, 100) == TEXT[:100]
    with pytest.raises(CorruptedError) as ei:
        img.read(1, 9500, 10)
    assert ei.value.errno == errno.EUCLEAN
    assert "inode 1" in str(ei.value) and "logical offset 9000" in str(ei.value)
    assert img.zreader.stats()["errors"] == 1


@pytest.mark.parametrize("second, says", [
    (pcluster(TEXT[9000:14001]), "decodes to undecodable, expected 5000"),  # too many: LZ4 refuses
    (pcluster(TEXT[9000:13999]), "decodes to 4999 bytes, expected 5000"),   # one byte too few
    (bytes(BS), "all zero padding"),
])
def test_an_lz4_pcluster_of_the_wrong_size_is_corruption(second, says):
    # the common lz4 case is decoded without decompress()'s dispatch (ZReader._decode); whatever
    # it does not take whole goes the general way and is reported the same
    img = two_extent_image()
    img.device = img.device[:2 * BS] + second
    assert img.read(1, 0, 9000) == TEXT[:9000]
    with pytest.raises(CorruptedError, match=says):
        img.read(1, 9000, 5000)


def test_pcluster_past_the_end_of_the_device_is_eio():
    img = two_extent_image()
    img.device = img.device[:2 * BS + 10]
    with pytest.raises(ShortReadError) as ei:
        img.read(1, 10000, 10)
    assert ei.value.errno == errno.EIO


def test_all_fragments_and_fragment_errors():
    packed = b"P" * 100 + TEXT[:5000]
    allfrag = bytes(32) + struct.pack("<Q", (1 << 63) | 100)
    img = FakeImage(b"", {1: allfrag, 2: bytes(32) + struct.pack("<Q", (1 << 63) | 4000)}, {1: 5000, 2: 5000},
                    packed_nid=99, packed=packed)
    assert img.read(1, 0, 6000) == TEXT[:5000]
    assert img.read(1, 4321, 7) == TEXT[4321:4328]
    with pytest.raises(CorruptedError, match="past the end of the packed inode"):
        img.read(2, 0, 5000)
    img.sb.packed_nid = 0
    with pytest.raises(CorruptedError, match="no packed inode"):
        img.read(1, 0, 10)


def test_fragment_inside_the_packed_inode_itself_is_corruption():
    allfrag = bytes(32) + struct.pack("<Q", 1 << 63)
    img = FakeImage(b"", {5: allfrag}, {5: 100}, packed_nid=5)
    with pytest.raises(CorruptedError):
        img.read(5, 0, 10)


def test_fragment_reads_that_nest_too_deep_stop():
    # inode 1's fragments live in the "packed inode" 2, whose fragments live in 1 ...: a cycle
    allfrag = bytes(32) + struct.pack("<Q", 1 << 63)
    img = FakeImage(b"", {1: allfrag, 2: allfrag}, {1: 100, 2: 100}, packed_nid=2)
    img.sb.packed_nid = 2
    orig = img.read

    def read(nid, off, n):
        if nid == 2:    # pretend the packed inode's own fragments point back at inode 1
            return img.zreader.read(img.inodes[1], off, n)
        return orig(nid, off, n)

    img.read = read
    with pytest.raises(CorruptedError, match="nest too deep"):
        img.read(1, 0, 10)


def test_ztailpacking_inline_pcluster_in_metadata():
    tail = lz4.block.compress(TEXT[4096:5000], store_size=False)
    hdr = struct.pack("<HHHBB", 0, len(tail), Z.Z_EROFS_ADVISE_INLINE_PCLUSTER, 0, 0)
    meta = bytes(32) + hdr + bytes(8) + head(1) + head(0) + tail
    img = FakeImage(bytes(BS) + pcluster(TEXT[:4096]), {1: meta}, {1: 5000})
    assert img.read(1, 0, 5000) == TEXT[:5000]
    zm, _ = img.zreader._zmap(img.inodes[1])
    assert zm.map(4999).kind == Z.ZEXT_META


def test_unknown_algorithm_in_superblock_is_refused_by_name():
    img = two_extent_image()
    img.sb.feature_incompat = 0x3
    img.sb.available_compr_algs = 0x30
    from erofs_mount.errors import UnsupportedError
    with pytest.raises(UnsupportedError, match="id"):
        ZReader(img)
