"""nid -> inode: compact (32 B) and extended (64 B) on-disk inodes (kernel ``erofs_read_inode``)."""

from __future__ import annotations

import stat
from dataclasses import dataclass

from ..errors import CorruptedError, UnsupportedError
from . import layout as L
from .superblock import Superblock

_FT_BY_MODE = {
    stat.S_IFREG: L.EROFS_FT_REG_FILE, stat.S_IFDIR: L.EROFS_FT_DIR, stat.S_IFCHR: L.EROFS_FT_CHRDEV,
    stat.S_IFBLK: L.EROFS_FT_BLKDEV, stat.S_IFIFO: L.EROFS_FT_FIFO, stat.S_IFSOCK: L.EROFS_FT_SOCK,
    stat.S_IFLNK: L.EROFS_FT_SYMLINK,
}


def new_decode_dev(dev: int) -> int:
    """The kernel's ``new_decode_dev()`` -> a Linux dev_t as ``os.makedev`` builds it."""
    major = (dev & 0xFFF00) >> 8
    minor = (dev & 0xFF) | ((dev >> 12) & 0xFFF00)
    return ((major & 0xFFF) << 8) | ((major & ~0xFFF) << 32) | (minor & 0xFF) | ((minor & ~0xFF) << 12)


@dataclass(slots=True, eq=False)
class Inode:
    """One decoded on-disk inode.  Shared through the reader's caches: never modify one.

    (Not ``frozen``: a frozen dataclass sets each of these 25 fields through ``object.__setattr__``,
    which made building one ~50% slower; a directory walk builds one per entry.)
    """

    nid: int
    ifmt: int
    version: int
    datalayout: int
    mode: int
    nlink: int
    size: int
    uid: int
    gid: int
    mtime: int
    mtime_nsec: int
    rdev: int
    ino: int
    inode_isize: int
    xattr_isize: int
    xattr_icount: int
    iloc: int
    in_metabox: bool
    raw_u: int
    raw_nb: int
    startblk: int
    chunkformat: int
    chunkbits: int
    dot_omitted: bool
    blocks: int  # st_blocks, 512-byte units, as the kernel reports them

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_lnk(self) -> bool:
        return stat.S_ISLNK(self.mode)

    @property
    def is_compressed(self) -> bool:
        return L.erofs_inode_is_data_compressed(self.datalayout)

    @property
    def file_type(self) -> int:
        return _FT_BY_MODE.get(stat.S_IFMT(self.mode), L.EROFS_FT_UNKNOWN)

    @property
    def data_start(self) -> int:
        """Where inline data / chunk indexes / the z_erofs map header region begins (metadata space)."""
        return self.iloc + self.inode_isize + self.xattr_isize


def iloc(sb: Superblock, nid: int) -> tuple[int, bool]:
    """Byte position of inode ``nid`` and whether it lives in the metabox (``erofs_iloc``)."""
    in_mbox = bool(nid >> L.EROFS_DIRENT_NID_METABOX_BIT)
    base = 0 if in_mbox else sb.meta_blkaddr << sb.blkszbits
    # erofs_off_t is a u64: a nid with high bits set wraps around like in the kernel's erofs_iloc
    return (base + ((nid & L.EROFS_DIRENT_NID_MASK) << L.EROFS_ISLOTBITS)) & ((1 << 64) - 1), in_mbox


def parse_inode(sb: Superblock, nid: int, raw: bytes, loc: tuple[int, bool] | None = None) -> Inode:
    """Decode the inode at ``nid`` from ``raw`` (at least 32 bytes; 64 for an extended inode).

    ``loc``: ``iloc(sb, nid)`` if the caller has it already."""
    pos, in_mbox = loc if loc is not None else iloc(sb, nid)
    if len(raw) < L.INODE_COMPACT.size:
        raise CorruptedError(f"inode {nid}: truncated on-disk inode")
    ifmt = int.from_bytes(raw[0:2], "little")
    if ifmt & ~L.EROFS_I_ALL:
        raise UnsupportedError(f"inode {nid}: unsupported i_format 0x{ifmt:x}")
    datalayout = (ifmt >> L.EROFS_I_DATALAYOUT_BIT) & L.EROFS_I_DATALAYOUT_MASK
    if datalayout >= L.EROFS_INODE_DATALAYOUT_MAX:
        raise UnsupportedError(f"inode {nid}: unsupported data layout {datalayout}")
    version = (ifmt >> L.EROFS_I_VERSION_BIT) & L.EROFS_I_VERSION_MASK
    addrmask = (1 << 48) - 1
    if version == L.EROFS_INODE_LAYOUT_EXTENDED:
        if len(raw) < L.INODE_EXTENDED.size:
            raise CorruptedError(f"inode {nid}: truncated extended inode")
        (_, icount, mode, nb, size, u, ino, uid, gid, mtime, mtime_nsec, nlink,
         _r) = L.INODE_EXTENDED.unpack_from(raw)
        isize = L.INODE_EXTENDED.size
        if mtime >= 1 << 63:
            mtime -= 1 << 64
    else:
        (_, icount, mode, nb, size, mtime32, u, ino, uid, gid, _r) = L.INODE_COMPACT.unpack_from(raw)
        isize = L.INODE_COMPACT.size
        if not stat.S_ISDIR(mode) and (ifmt >> L.EROFS_I_NLINK_1_BIT) & 1:
            nlink = 1
        else:
            nlink = nb
            nb = 0  # i_nb held the link count, not startblk_hi
            addrmask = (1 << 32) - 1
        mtime = sb.epoch + mtime32
        mtime_nsec = sb.fixed_nsec
    xattr_isize = 12 + 4 * (icount - 1) if icount else 0
    if size >= 1 << 63:   # i_size is a loff_t: the kernel refuses a negative one (erofs_read_inode)
        raise CorruptedError(f"inode {nid}: negative i_size")

    fmt = stat.S_IFMT(mode)
    rdev = 0
    startblk = 0
    dot_omitted = False
    if fmt in (stat.S_IFDIR, stat.S_IFREG, stat.S_IFLNK):
        if fmt == stat.S_IFDIR:
            dot_omitted = bool((ifmt >> L.EROFS_I_DOT_OMITTED_BIT) & 1)
        startblk = u | (nb << 32)
        if datalayout == L.EROFS_INODE_FLAT_PLAIN and not ((startblk ^ L.EROFS_NULL_ADDR) & addrmask):
            startblk = L.EROFS_NULL_ADDR
    elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
        rdev = new_decode_dev(u)
    elif fmt in (stat.S_IFIFO, stat.S_IFSOCK):
        rdev = 0
    else:
        raise CorruptedError(f"inode {nid}: bogus i_mode 0{mode:o}")

    chunkformat = chunkbits = 0
    if datalayout == L.EROFS_INODE_CHUNK_BASED:
        chunkformat = u & 0xFFFF
        if chunkformat & ~L.EROFS_CHUNK_FORMAT_ALL:
            raise UnsupportedError(f"inode {nid}: unsupported chunk format 0x{chunkformat:x}")
        chunkbits = sb.blkszbits + (chunkformat & L.EROFS_CHUNK_FORMAT_BLKBITS_MASK)
        if chunkbits > 63:
            raise CorruptedError(f"inode {nid}: chunk size 2^{chunkbits} out of range")

    if L.erofs_inode_is_data_compressed(datalayout):
        nblks = u | ((nb << 32) if sb.is_48bit else 0)
        blocks = nblks << (sb.blkszbits - 9)
    else:
        bs = sb.block_size
        blocks = ((size + bs - 1) // bs * bs) >> 9
    return Inode(
        nid=nid, ifmt=ifmt, version=version, datalayout=datalayout, mode=mode, nlink=nlink, size=size,
        uid=uid, gid=gid, mtime=mtime, mtime_nsec=mtime_nsec, rdev=rdev, ino=ino, inode_isize=isize,
        xattr_isize=xattr_isize, xattr_icount=icount, iloc=pos, in_metabox=in_mbox, raw_u=u, raw_nb=nb,
        startblk=startblk, chunkformat=chunkformat, chunkbits=chunkbits, dot_omitted=dot_omitted,
        blocks=blocks,
    )
