"""On-disk layouts of EROFS, named as in the kernel's ``fs/erofs/erofs_fs.h``.

Only ``struct`` layouts and constants live here; decoding is in the modules
that use them.  Sizes are checked at import time like the header's
``erofs_check_ondisk_layout_definitions()`` BUILD_BUG_ONs.
"""

from __future__ import annotations

import struct

EROFS_SUPER_MAGIC_V1 = 0xE0F5E1E2
EROFS_SUPER_OFFSET = 1024
EROFS_SB_EXTSLOT_SIZE = 16
EROFS_ISLOTBITS = 5
EROFS_NAME_LEN = 255

# feature_compat
EROFS_FEATURE_COMPAT_SB_CHKSUM = 0x00000001
EROFS_FEATURE_COMPAT_MTIME = 0x00000002
EROFS_FEATURE_COMPAT_XATTR_FILTER = 0x00000004
EROFS_FEATURE_COMPAT_SHARED_EA_IN_METABOX = 0x00000008
EROFS_FEATURE_COMPAT_PLAIN_XATTR_PFX = 0x00000010
EROFS_FEATURE_COMPAT_ISHARE_XATTRS = 0x00000020

COMPAT_NAMES = {
    EROFS_FEATURE_COMPAT_SB_CHKSUM: "sb_csum",
    EROFS_FEATURE_COMPAT_MTIME: "mtime",
    EROFS_FEATURE_COMPAT_XATTR_FILTER: "xattr_filter",
    EROFS_FEATURE_COMPAT_SHARED_EA_IN_METABOX: "shared_ea_in_metabox",
    EROFS_FEATURE_COMPAT_PLAIN_XATTR_PFX: "plain_xattr_pfx",
    EROFS_FEATURE_COMPAT_ISHARE_XATTRS: "ishare_xattrs",
}

# feature_incompat (some bits carry two names, see erofs_fs.h)
EROFS_FEATURE_INCOMPAT_LZ4_0PADDING = 0x00000001
EROFS_FEATURE_INCOMPAT_COMPR_CFGS = 0x00000002
EROFS_FEATURE_INCOMPAT_BIG_PCLUSTER = 0x00000002
EROFS_FEATURE_INCOMPAT_CHUNKED_FILE = 0x00000004
EROFS_FEATURE_INCOMPAT_DEVICE_TABLE = 0x00000008
EROFS_FEATURE_INCOMPAT_COMPR_HEAD2 = 0x00000008
EROFS_FEATURE_INCOMPAT_ZTAILPACKING = 0x00000010
EROFS_FEATURE_INCOMPAT_FRAGMENTS = 0x00000020
EROFS_FEATURE_INCOMPAT_DEDUPE = 0x00000020
EROFS_FEATURE_INCOMPAT_XATTR_PREFIXES = 0x00000040
EROFS_FEATURE_INCOMPAT_48BIT = 0x00000080
EROFS_FEATURE_INCOMPAT_METABOX = 0x00000100
EROFS_ALL_FEATURE_INCOMPAT = (EROFS_FEATURE_INCOMPAT_METABOX << 1) - 1

INCOMPAT_NAMES = {
    EROFS_FEATURE_INCOMPAT_LZ4_0PADDING: "lz4_0padding",
    EROFS_FEATURE_INCOMPAT_COMPR_CFGS: "compr_cfgs|big_pcluster",
    EROFS_FEATURE_INCOMPAT_CHUNKED_FILE: "chunked_file",
    EROFS_FEATURE_INCOMPAT_DEVICE_TABLE: "device_table|compr_head2",
    EROFS_FEATURE_INCOMPAT_ZTAILPACKING: "ztailpacking",
    EROFS_FEATURE_INCOMPAT_FRAGMENTS: "fragments|dedupe",
    EROFS_FEATURE_INCOMPAT_XATTR_PREFIXES: "xattr_prefixes",
    EROFS_FEATURE_INCOMPAT_48BIT: "48bit",
    EROFS_FEATURE_INCOMPAT_METABOX: "metabox",
}


def feature_names(bits: int, table: dict[int, str]) -> list[str]:
    """Names of the set bits; unknown bits as ``0x...``."""
    out = []
    for bit in range(32):
        v = 1 << bit
        if bits & v:
            out.append(table.get(v, f"unknown(0x{v:x})"))
    return out


# struct erofs_super_block (144 bytes at most; 128 + sb_extslots * 16)
SUPER_BLOCK = struct.Struct(
    "<I"    # magic
    "I"     # checksum
    "I"     # feature_compat
    "B"     # blkszbits
    "B"     # sb_extslots
    "H"     # rb: rootnid_2b / blocks_hi
    "Q"     # inos
    "Q"     # epoch
    "I"     # fixed_nsec
    "I"     # blocks_lo
    "I"     # meta_blkaddr
    "I"     # xattr_blkaddr
    "16s"   # uuid
    "16s"   # volume_name
    "I"     # feature_incompat
    "H"     # u1: available_compr_algs / lz4_max_distance
    "H"     # extra_devices
    "H"     # devt_slotoff
    "B"     # dirblkbits
    "B"     # xattr_prefix_count
    "I"     # xattr_prefix_start
    "Q"     # packed_nid
    "B"     # xattr_filter_reserved
    "B"     # ishare_xattr_prefix_id
    "2s"    # reserved
    "I"     # build_time
    "Q"     # rootnid_8b
    "Q"     # reserved2
    "Q"     # metabox_nid
    "Q"     # reserved3
)
SB_CHECKSUM_OFFSET = 4  # of the checksum field within the superblock

# struct erofs_deviceslot (128 bytes)
DEVICESLOT = struct.Struct("<64sIIHH52s")
EROFS_DEVT_SLOT_SIZE = DEVICESLOT.size

# inode i_format bits
EROFS_I_VERSION_MASK = 0x01
EROFS_I_DATALAYOUT_MASK = 0x07
EROFS_I_VERSION_BIT = 0
EROFS_I_DATALAYOUT_BIT = 1
EROFS_I_NLINK_1_BIT = 4      # non-directory compact inodes only
EROFS_I_DOT_OMITTED_BIT = 4  # directories: the "." dirent is omitted
EROFS_I_ALL = (1 << (EROFS_I_NLINK_1_BIT + 1)) - 1

EROFS_INODE_LAYOUT_COMPACT = 0
EROFS_INODE_LAYOUT_EXTENDED = 1

EROFS_INODE_FLAT_PLAIN = 0
EROFS_INODE_COMPRESSED_FULL = 1
EROFS_INODE_FLAT_INLINE = 2
EROFS_INODE_COMPRESSED_COMPACT = 3
EROFS_INODE_CHUNK_BASED = 4
EROFS_INODE_DATALAYOUT_MAX = 5

DATALAYOUT_NAMES = {
    EROFS_INODE_FLAT_PLAIN: "flat_plain",
    EROFS_INODE_COMPRESSED_FULL: "compressed_full",
    EROFS_INODE_FLAT_INLINE: "flat_inline",
    EROFS_INODE_COMPRESSED_COMPACT: "compressed_compact",
    EROFS_INODE_CHUNK_BASED: "chunk_based",
}


def erofs_inode_is_data_compressed(datalayout: int) -> bool:
    return datalayout in (EROFS_INODE_COMPRESSED_COMPACT, EROFS_INODE_COMPRESSED_FULL)


# chunk format
EROFS_CHUNK_FORMAT_BLKBITS_MASK = 0x001F
EROFS_CHUNK_FORMAT_INDEXES = 0x0020
EROFS_CHUNK_FORMAT_48BIT = 0x0040
EROFS_CHUNK_FORMAT_ALL = (EROFS_CHUNK_FORMAT_48BIT << 1) - 1

# struct erofs_inode_compact (32 bytes):
#   i_format, i_xattr_icount, i_mode, i_nb, i_size(32), i_mtime(32), i_u, i_ino, i_uid(16), i_gid(16), reserved
INODE_COMPACT = struct.Struct("<HHHHIIIIHHI")
# struct erofs_inode_extended (64 bytes):
#   i_format, i_xattr_icount, i_mode, i_nb, i_size(64), i_u, i_ino, i_uid, i_gid, i_mtime(64), i_mtime_nsec,
#   i_nlink, reserved[16]
INODE_EXTENDED = struct.Struct("<HHHHQIIIIQII16s")

# struct erofs_xattr_ibody_header (12 bytes) + h_shared_xattrs[]
XATTR_IBODY_HEADER = struct.Struct("<IB7s")
# struct erofs_xattr_entry (4 bytes) + name + value
XATTR_ENTRY = struct.Struct("<BBH")

EROFS_XATTR_INDEX_USER = 1
EROFS_XATTR_INDEX_POSIX_ACL_ACCESS = 2
EROFS_XATTR_INDEX_POSIX_ACL_DEFAULT = 3
EROFS_XATTR_INDEX_TRUSTED = 4
EROFS_XATTR_INDEX_LUSTRE = 5
EROFS_XATTR_INDEX_SECURITY = 6
EROFS_XATTR_LONG_PREFIX = 0x80
EROFS_XATTR_LONG_PREFIX_MASK = 0x7F

# the kernel's erofs_xattr_handlers / xattr prefixes (fs/erofs/xattr.c)
XATTR_PREFIXES = {
    EROFS_XATTR_INDEX_USER: b"user.",
    EROFS_XATTR_INDEX_POSIX_ACL_ACCESS: b"system.posix_acl_access",
    EROFS_XATTR_INDEX_POSIX_ACL_DEFAULT: b"system.posix_acl_default",
    EROFS_XATTR_INDEX_TRUSTED: b"trusted.",
    EROFS_XATTR_INDEX_SECURITY: b"security.",
}

# struct erofs_inode_chunk_index (8 bytes): startblk_hi, device_id, startblk_lo
CHUNK_INDEX = struct.Struct("<HHI")
EROFS_BLOCK_MAP_ENTRY_SIZE = 4
EROFS_NULL_ADDR = (1 << 64) - 1

# struct erofs_dirent (12 bytes)
DIRENT = struct.Struct("<QHBB")
EROFS_DIRENT_NID_METABOX_BIT = 63
EROFS_DIRENT_NID_MASK = (1 << EROFS_DIRENT_NID_METABOX_BIT) - 1

# file types (EROFS_FT_*)
EROFS_FT_UNKNOWN = 0
EROFS_FT_REG_FILE = 1
EROFS_FT_DIR = 2
EROFS_FT_CHRDEV = 3
EROFS_FT_BLKDEV = 4
EROFS_FT_FIFO = 5
EROFS_FT_SOCK = 6
EROFS_FT_SYMLINK = 7
EROFS_FT_MAX = 8

# z_erofs_map_header (8 bytes) and z_erofs_lcluster_index (8 bytes), used by zmap.py
Z_EROFS_MAP_HEADER = struct.Struct("<IHBB")
Z_EROFS_LCLUSTER_INDEX = struct.Struct("<HHI")

_SIZES = {
    "SUPER_BLOCK": (SUPER_BLOCK.size, 144),
    "INODE_COMPACT": (INODE_COMPACT.size, 32),
    "INODE_EXTENDED": (INODE_EXTENDED.size, 64),
    "XATTR_IBODY_HEADER": (XATTR_IBODY_HEADER.size, 12),
    "XATTR_ENTRY": (XATTR_ENTRY.size, 4),
    "CHUNK_INDEX": (CHUNK_INDEX.size, 8),
    "DIRENT": (DIRENT.size, 12),
    "DEVICESLOT": (DEVICESLOT.size, 128),
    "Z_EROFS_MAP_HEADER": (Z_EROFS_MAP_HEADER.size, 8),
    "Z_EROFS_LCLUSTER_INDEX": (Z_EROFS_LCLUSTER_INDEX.size, 8),
}
for _name, (_got, _want) in _SIZES.items():  # the header's BUILD_BUG_ONs
    if _got != _want:  # pragma: no cover - a broken edit of this file
        raise AssertionError(f"{_name} is {_got} bytes, erofs_fs.h says {_want}")
