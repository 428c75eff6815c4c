"""On-disk struct sizes and the pure decoders, with hand-built bytes."""

import struct

import pytest

from erofs_mount.erofs import layout as L
from erofs_mount.erofs.dirent import parse_block, search_block
from erofs_mount.erofs.inode import new_decode_dev, parse_inode
from erofs_mount.erofs.superblock import crc32c_raw, parse_superblock
from erofs_mount.errors import ChecksumError, CorruptedError, NotErofsError, ShortReadError, UnsupportedError


@pytest.mark.parametrize("layout, size", [
    (L.SUPER_BLOCK, 144), (L.INODE_COMPACT, 32), (L.INODE_EXTENDED, 64), (L.DIRENT, 12), (L.XATTR_ENTRY, 4),
    (L.XATTR_IBODY_HEADER, 12), (L.CHUNK_INDEX, 8), (L.DEVICESLOT, 128), (L.Z_EROFS_MAP_HEADER, 8),
    (L.Z_EROFS_LCLUSTER_INDEX, 8),
])
def test_struct_sizes(layout, size):
    assert layout.size == size


def test_superblock_field_offsets():
    # offsets used by the format (erofs_fs.h): feature_incompat at 80, packed_nid at 96, metabox_nid at 128
    raw = bytearray(144)
    struct.pack_into("<I", raw, 80, 0xABCD)
    struct.pack_into("<Q", raw, 96, 0x1234)
    struct.pack_into("<Q", raw, 128, 0x5678)
    vals = L.SUPER_BLOCK.unpack(bytes(raw))
    assert vals[14] == 0xABCD and vals[21] == 0x1234 and vals[28] == 0x5678


def test_crc32c_known_vector():
    # CRC-32C("123456789") = 0xE3069283 (with the usual inversions)
    assert crc32c_raw(0xFFFFFFFF, b"123456789") ^ 0xFFFFFFFF == 0xE3069283


def make_sb(**kw) -> bytearray:
    blkszbits = kw.get("blkszbits", 12)
    head = bytearray(1 << max(blkszbits, 11))
    vals = dict(magic=L.EROFS_SUPER_MAGIC_V1, compat=0, blkszbits=blkszbits, incompat=0, root=1)
    vals.update(kw)
    struct.pack_into("<IIIBBH", head, 1024, vals["magic"], 0, vals["compat"], vals["blkszbits"], 0, vals["root"])
    struct.pack_into("<I", head, 1024 + 80, vals["incompat"])
    if vals["compat"] & L.EROFS_FEATURE_COMPAT_SB_CHKSUM:
        n = (1 << blkszbits) - 1024 if (1 << blkszbits) > 1024 else 1 << blkszbits
        crc = crc32c_raw(0xFFFFFFFF, bytes(head[1024:1024 + n]))
        struct.pack_into("<I", head, 1028, crc)
    return head


def test_superblock_ok_and_checksum():
    head = make_sb(compat=L.EROFS_FEATURE_COMPAT_SB_CHKSUM)
    sb = parse_superblock(bytes(head))
    assert sb.block_size == 4096 and sb.root_nid == 1 and sb.checksum_ok
    head[1024 + 40] ^= 1  # a byte inside the checksummed area
    with pytest.raises(ChecksumError):
        parse_superblock(bytes(head))


def test_superblock_checksum_512_byte_blocks():
    sb = parse_superblock(bytes(make_sb(blkszbits=9, compat=L.EROFS_FEATURE_COMPAT_SB_CHKSUM)))
    assert sb.block_size == 512 and sb.checksum_ok


def test_superblock_refusals():
    with pytest.raises(NotErofsError, match="bad magic at offset 1024"):
        parse_superblock(bytes(make_sb(magic=0)))
    with pytest.raises(NotErofsError):
        parse_superblock(b"\0" * 100)
    with pytest.raises(ShortReadError):
        parse_superblock(bytes(make_sb())[:1100])
    with pytest.raises(UnsupportedError, match="0x200"):
        parse_superblock(bytes(make_sb(incompat=0x200)))
    with pytest.raises(UnsupportedError, match="block size"):
        parse_superblock(bytes(make_sb(blkszbits=8)))


def test_superblock_48bit_root_nid():
    head = make_sb(incompat=L.EROFS_FEATURE_INCOMPAT_48BIT)
    struct.pack_into("<Q", head, 1024 + 112, 1 << 40)  # rootnid_8b
    struct.pack_into("<H", head, 1024 + 14, 7)          # blocks_hi
    struct.pack_into("<I", head, 1024 + 36, 5)          # blocks_lo
    sb = parse_superblock(bytes(head))
    assert sb.root_nid == 1 << 40 and sb.blocks == (7 << 32) | 5


def sb4k():
    return parse_superblock(bytes(make_sb()))


def test_compact_inode_fields():
    sb = sb4k()
    raw = L.INODE_COMPACT.pack(L.EROFS_INODE_FLAT_PLAIN << 1, 0, 0o100644, 3, 10, 5, 0xFFFFFFFF, 9, 1000, 1001, 0)
    ino = parse_inode(sb, 7, raw)
    assert (ino.nlink, ino.size, ino.uid, ino.gid, ino.ino) == (3, 10, 1000, 1001, 9)
    assert ino.mtime == sb.epoch + 5 and ino.mtime_nsec == sb.fixed_nsec
    assert ino.startblk == L.EROFS_NULL_ADDR  # a null block address reads as a hole
    # NLINK_1 bit: i_nb is startblk_hi, the link count is 1
    raw = L.INODE_COMPACT.pack((1 << 4) | (L.EROFS_INODE_FLAT_PLAIN << 1), 0, 0o100644, 2, 10, 0, 3, 0, 0, 0, 0)
    ino = parse_inode(sb, 7, raw)
    assert ino.nlink == 1 and ino.startblk == (2 << 32) | 3


def test_extended_inode_fields_and_devices():
    sb = sb4k()
    rdev_enc = (0x12 << 8) | 0x34 | (0x56 << 12 << 8)  # major 0x12, minor 0x5634 (new_encode_dev)
    raw = L.INODE_EXTENDED.pack(1, 0, 0o20600, 0, 0, rdev_enc, 3, 70000, 70001, (1 << 64) - 1, 999, 1, b"")
    ino = parse_inode(sb, 8, raw)
    import os
    assert (os.major(ino.rdev), os.minor(ino.rdev)) == (0x12, 0x5634)
    assert ino.mtime == -1 and ino.mtime_nsec == 999 and ino.uid == 70000
    assert new_decode_dev(0) == 0


def test_inode_refusals():
    sb = sb4k()
    with pytest.raises(UnsupportedError, match="i_format"):
        parse_inode(sb, 1, L.INODE_COMPACT.pack(0x40, 0, 0o100644, 1, 0, 0, 0, 0, 0, 0, 0))
    with pytest.raises(UnsupportedError, match="layout"):
        parse_inode(sb, 1, L.INODE_COMPACT.pack(6 << 1, 0, 0o100644, 1, 0, 0, 0, 0, 0, 0, 0))
    with pytest.raises(CorruptedError, match="i_mode"):
        parse_inode(sb, 1, L.INODE_COMPACT.pack(0, 0, 0o170644, 1, 0, 0, 0, 0, 0, 0, 0))
    with pytest.raises(CorruptedError):
        parse_inode(sb, 1, b"\0" * 16)


def dir_block(names, bs=64):
    recs = b""
    heap = b""
    off = 12 * len(names)
    for i, n in enumerate(names):
        recs += L.DIRENT.pack(100 + i, off + len(heap), L.EROFS_FT_REG_FILE, 0)
        heap += n
    return (recs + heap).ljust(bs, b"\0")


def test_dirent_block_roundtrip_and_search():
    names = [b".", b"..", b"a", b"bb", b"ccc"]
    recs = parse_block(dir_block(names), 1, 0)
    assert [r[0] for r in recs] == names
    assert search_block(recs, b"bb") == (103, L.EROFS_FT_REG_FILE)
    assert search_block(recs, b"b") is None


def test_dirent_corruption():
    blk = bytearray(dir_block([b".", b"..", b"a"]))
    struct.pack_into("<H", blk, 12 + 8, 500)  # de[1].nameoff beyond the block
    with pytest.raises(CorruptedError):
        parse_block(bytes(blk), 1, 0)
    blk = bytearray(dir_block([b"a"]))
    struct.pack_into("<H", blk, 8, 3)  # de[0].nameoff smaller than a dirent
    with pytest.raises(CorruptedError, match="nameoff"):
        parse_block(bytes(blk), 1, 0)
