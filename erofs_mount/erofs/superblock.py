"""Decode and validate the EROFS superblock (the kernel's ``erofs_read_superblock``)."""

from __future__ import annotations

import uuid as _uuid
from dataclasses import dataclass, field

from ..errors import ChecksumError, CorruptedError, NotErofsError, ShortReadError, UnsupportedError
from . import layout as L

_CRC32C_TABLE: list[int] = []


def _crc32c_table() -> list[int]:
    if not _CRC32C_TABLE:
        for i in range(256):
            c = i
            for _ in range(8):
                c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
            _CRC32C_TABLE.append(c)
    return _CRC32C_TABLE


def crc32c_raw(crc: int, data: bytes) -> int:
    """CRC-32C (Castagnoli) without pre/post inversion, like the kernel's ``crc32c(crc, p, len)``."""
    table = _crc32c_table()
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc


@dataclass(frozen=True, slots=True)
class DeviceSlot:
    tag: bytes
    blocks: int
    uniaddr: int  # first block of this device in the unified address space (0: none)


@dataclass(frozen=True, slots=True)
class Superblock:
    magic: int
    checksum: int
    feature_compat: int
    blkszbits: int
    sb_extslots: int
    root_nid: int
    inos: int
    epoch: int
    fixed_nsec: int
    blocks: int
    meta_blkaddr: int
    xattr_blkaddr: int
    uuid: bytes
    volume_name: str
    feature_incompat: int
    available_compr_algs: int  # the raw u1 field: lz4_max_distance when COMPR_CFGS is off
    extra_devices: int
    devt_slotoff: int
    dirblkbits: int
    xattr_prefix_count: int
    xattr_prefix_start: int
    packed_nid: int
    ishare_xattr_prefix_id: int
    build_time: int
    metabox_nid: int
    checksum_ok: bool | None = None  # None: the image carries no checksum
    devices: tuple[DeviceSlot, ...] = field(default=())
    xattr_filter_reserved: int = 0   # non-zero: the xattr name filter's format changed, ignore it

    @property
    def block_size(self) -> int:
        return 1 << self.blkszbits

    @property
    def sb_size(self) -> int:
        return 128 + self.sb_extslots * L.EROFS_SB_EXTSLOT_SIZE

    def has_compat(self, bit: int) -> bool:
        return bool(self.feature_compat & bit)

    def has_incompat(self, bit: int) -> bool:
        return bool(self.feature_incompat & bit)

    @property
    def is_48bit(self) -> bool:
        return self.has_incompat(L.EROFS_FEATURE_INCOMPAT_48BIT)

    @property
    def has_metabox(self) -> bool:
        return self.has_incompat(L.EROFS_FEATURE_INCOMPAT_METABOX)

    @property
    def marks_compression(self) -> bool:
        """The superblock says the image holds compressed data: mkfs.erofs sets lz4_0padding (or
        compr_cfgs for other algorithms) when it compresses.  Very old lz4 images set neither."""
        return self.has_incompat(L.EROFS_FEATURE_INCOMPAT_LZ4_0PADDING | L.EROFS_FEATURE_INCOMPAT_COMPR_CFGS)

    @property
    def lz4_only(self) -> bool:
        """The compressed data, if any, is all lz4 (no compr_cfgs, or lz4 alone in them)."""
        return not self.has_incompat(L.EROFS_FEATURE_INCOMPAT_COMPR_CFGS) or self.available_compr_algs == 1

    @property
    def lz4_max_distance(self) -> int:
        return 0 if self.has_incompat(L.EROFS_FEATURE_INCOMPAT_COMPR_CFGS) else self.available_compr_algs

    @property
    def uuid_str(self) -> str:
        return str(_uuid.UUID(bytes=self.uuid))

    @property
    def compat_names(self) -> list[str]:
        return L.feature_names(self.feature_compat, L.COMPAT_NAMES)

    @property
    def incompat_names(self) -> list[str]:
        return L.feature_names(self.feature_incompat, L.INCOMPAT_NAMES)


def parse_superblock(head: bytes) -> Superblock:
    """Decode the superblock from the image's first bytes.

    ``head`` must hold at least 1024 + 144 bytes, and the whole first block when the
    image is checksummed (the kernel's ``erofs_superblock_csum_verify`` covers the
    block from offset 1024, or 512 bytes of it for 512-byte blocks).
    """
    if len(head) < L.EROFS_SUPER_OFFSET + 128:
        if len(head) >= L.EROFS_SUPER_OFFSET + 4 and int.from_bytes(
                head[L.EROFS_SUPER_OFFSET:L.EROFS_SUPER_OFFSET + 4], "little") == L.EROFS_SUPER_MAGIC_V1:
            raise ShortReadError(f"image truncated inside the superblock ({len(head)} bytes)")
        raise NotErofsError(f"not an EROFS image (too small: {len(head)} bytes)")
    raw = head[L.EROFS_SUPER_OFFSET:L.EROFS_SUPER_OFFSET + L.SUPER_BLOCK.size]
    raw = raw.ljust(L.SUPER_BLOCK.size, b"\0")
    (magic, checksum, compat, blkszbits, extslots, rb, inos, epoch, fixed_nsec, blocks_lo, meta_blkaddr,
     xattr_blkaddr, uuid, volume_name, incompat, u1, extra_devices, devt_slotoff, dirblkbits,
     xattr_prefix_count, xattr_prefix_start, packed_nid, _filter_res, ishare_id, _res, build_time,
     rootnid_8b, _res2, metabox_nid, _res3) = L.SUPER_BLOCK.unpack(raw)
    if magic != L.EROFS_SUPER_MAGIC_V1:
        raise NotErofsError("not an EROFS image (bad magic at offset 1024)")
    if not 9 <= blkszbits <= 16:
        raise UnsupportedError(f"block size 2^{blkszbits} is not supported (512..65536)")
    unknown = incompat & ~L.EROFS_ALL_FEATURE_INCOMPAT
    if unknown:
        raise UnsupportedError(f"unknown incompatible feature bits 0x{unknown:x} "
                               f"({', '.join(L.feature_names(unknown, {}))})")
    sb_size = 128 + extslots * L.EROFS_SB_EXTSLOT_SIZE
    block_size = 1 << blkszbits
    if L.EROFS_SUPER_OFFSET + sb_size > max(block_size, L.EROFS_SUPER_OFFSET + 512) or sb_size > 1024:
        raise CorruptedError(f"invalid sb_extslots {extslots}")
    if dirblkbits:
        raise UnsupportedError(f"directory block size bits {dirblkbits} are not supported")

    checksum_ok = None
    if compat & L.EROFS_FEATURE_COMPAT_SB_CHKSUM:
        length = block_size - L.EROFS_SUPER_OFFSET if block_size > L.EROFS_SUPER_OFFSET else block_size
        area = head[L.EROFS_SUPER_OFFSET:L.EROFS_SUPER_OFFSET + length]
        if len(area) < length:
            raise ShortReadError("image truncated inside the superblock block")
        area = area[:L.SB_CHECKSUM_OFFSET] + b"\0\0\0\0" + area[L.SB_CHECKSUM_OFFSET + 4:]
        crc = crc32c_raw(0xFFFFFFFF, area)
        checksum_ok = crc == checksum
        if not checksum_ok:
            raise ChecksumError(f"superblock checksum mismatch (stored 0x{checksum:08x}, computed 0x{crc:08x})")

    is_48bit = bool(incompat & L.EROFS_FEATURE_INCOMPAT_48BIT)
    blocks = blocks_lo
    if is_48bit and rootnid_8b:
        root_nid = rootnid_8b
        blocks |= rb << 32
    else:
        root_nid = rb
    if packed_nid >> L.EROFS_DIRENT_NID_METABOX_BIT:
        raise CorruptedError("packed inode nid points into the metabox")
    if incompat & L.EROFS_FEATURE_INCOMPAT_METABOX:
        if sb_size <= 128:  # offsetof(struct erofs_super_block, metabox_nid) == 128
            raise CorruptedError("metabox feature set but superblock too short for metabox_nid")
        if metabox_nid >> L.EROFS_DIRENT_NID_METABOX_BIT:
            raise CorruptedError("metabox nid points into the metabox itself")
    else:
        metabox_nid = 0
    return Superblock(
        magic=magic, checksum=checksum, feature_compat=compat, blkszbits=blkszbits, sb_extslots=extslots,
        root_nid=root_nid, inos=inos, epoch=epoch if epoch < (1 << 63) else epoch - (1 << 64),
        fixed_nsec=fixed_nsec, blocks=blocks, meta_blkaddr=meta_blkaddr, xattr_blkaddr=xattr_blkaddr,
        uuid=uuid, volume_name=volume_name.rstrip(b"\0").decode("utf-8", "replace"),
        feature_incompat=incompat, available_compr_algs=u1,
        extra_devices=extra_devices if incompat & L.EROFS_FEATURE_INCOMPAT_DEVICE_TABLE else 0,
        devt_slotoff=devt_slotoff, dirblkbits=dirblkbits, xattr_prefix_count=xattr_prefix_count,
        xattr_prefix_start=xattr_prefix_start, packed_nid=packed_nid, ishare_xattr_prefix_id=ishare_id,
        build_time=build_time, metabox_nid=metabox_nid, checksum_ok=checksum_ok,
        xattr_filter_reserved=_filter_res,
    )


def parse_device_table(sb: Superblock, table: bytes) -> tuple[DeviceSlot, ...]:
    """Decode ``sb.extra_devices`` device slots from the bytes at ``devt_slotoff * 128``."""
    out = []
    for i in range(sb.extra_devices):
        chunk = table[i * L.EROFS_DEVT_SLOT_SIZE:(i + 1) * L.EROFS_DEVT_SLOT_SIZE]
        if len(chunk) < L.EROFS_DEVT_SLOT_SIZE:
            raise CorruptedError(f"device table truncated at slot {i}")
        tag, blocks_lo, uniaddr_lo, blocks_hi, uniaddr_hi, _ = L.DEVICESLOT.unpack(chunk)
        blocks = blocks_lo | ((blocks_hi << 32) if sb.is_48bit else 0)
        uniaddr = uniaddr_lo | ((uniaddr_hi << 32) if sb.is_48bit else 0)
        out.append(DeviceSlot(tag=tag.rstrip(b"\0"), blocks=blocks, uniaddr=uniaddr))
    return tuple(out)
