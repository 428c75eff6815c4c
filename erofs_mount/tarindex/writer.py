"""Serialise a :class:`~.tree.Tree` as an EROFS tar index: metadata whose file data is the tar.

The device the kernel (or our reader) sees is ``index + tar``: ``build_index`` returns the
index, a multiple of 512 bytes, and a regular file whose data starts at tar offset ``D`` has
its data at block ``(len(index) + D) / 512``.  Like ``mkfs.erofs --tar=i`` (mkfs/main.c forces
512-byte blocks for a tar index so every tar data offset is a block boundary), but with the tar
on the same device as the index, so no device table and no chunk indexes are needed: regular
files are ``EROFS_INODE_FLAT_PLAIN`` with ``raw_blkaddr`` pointing into the tar (erofs-utils
lib/blobchunk.c ``tarerofs_write_chunkes`` uses CHUNK_BASED inodes addressing an extra device
instead).  The 32-bit ``raw_blkaddr`` limits the device to 2 TiB.

Layout (two passes; no metadata size depends on an address value, so the index size is fixed
before any address is written):

* bytes 0-1023 zero, the superblock at 1024 (128 bytes, ``sb_extslots`` 0, ``meta_blkaddr`` 0,
  crc32c over bytes 1024-1535 as the kernel's ``erofs_superblock_csum_verify`` checks it);
* inode records from byte 1152 on, root first then breadth-first in name order (the root nid,
  36, fits ``rootnid_2b``).  Each record is a 64-byte extended inode (per-file mtime with ns,
  32-bit uid/gid, 64-bit size: compact inodes have none of these), its inline xattrs
  (``erofs_xattr_ibody_header``, no shared xattrs, entries sorted by name) and its inline tail.
  Records start at 32-byte slots (nid = byte offset / 32); a record that fits in a block never
  crosses one (fs/erofs/data.c ``erofs_map_blocks``: "inline data cross block boundary");
* directory and symlink data: dirent blocks (``.`` and ``..`` included, names sorted bytewise
  as fs/erofs/namei.c's binary search needs, as many per 512-byte block as fit); the last
  partial block is inline (FLAT_INLINE) when inode + xattrs + tail fit one block, else the
  whole data is FLAT_PLAIN in block-aligned blocks after the inode records;
* regular files FLAT_PLAIN into the tar (empty ones: no data, ``raw_blkaddr`` = NULL like
  mkfs.erofs); devices carry ``new_encode_dev(rdev)`` in ``i_u``; hard links share one nid;
  directory nlink = 2 + subdirectories.

Deterministic: the same tree and arguments give the same bytes.  The default UUID is derived
from the index (with a zero UUID) and ``tar_size``; the default build time is the newest mtime.
"""

from __future__ import annotations

import hashlib
import stat
from collections import deque

from ..errors import ImageError, UnsupportedError
from ..erofs import layout as L
from ..erofs.superblock import crc32c_raw
from .tarparse import TarParser
from .tree import MAX_ENTRIES, Node, Tree, overlay_whiteouts, xattr_entry_size, xattr_split

BLKSZBITS = 9
BS = 1 << BLKSZBITS
SB_SIZE = 128
META_START = L.EROFS_SUPER_OFFSET + SB_SIZE
NULL_ADDR32 = 0xFFFFFFFF

_IFMT = {"reg": stat.S_IFREG, "dir": stat.S_IFDIR, "symlink": stat.S_IFLNK, "chr": stat.S_IFCHR,
         "blk": stat.S_IFBLK, "fifo": stat.S_IFIFO}
_FT = {"reg": L.EROFS_FT_REG_FILE, "dir": L.EROFS_FT_DIR, "symlink": L.EROFS_FT_SYMLINK,
       "chr": L.EROFS_FT_CHRDEV, "blk": L.EROFS_FT_BLKDEV, "fifo": L.EROFS_FT_FIFO}


def new_encode_dev(major: int, minor: int) -> int:
    """The kernel's ``new_encode_dev`` (include/linux/kdev_t.h), as erofs-utils stores i_rdev."""
    return (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)


def _xattr_body(node: Node) -> bytes:
    if not node.xattrs:
        return b""
    out = [L.XATTR_IBODY_HEADER.pack(0, 0, bytes(7))]
    for name, value in node.xattrs:
        index, suffix = xattr_split(name)
        ent = L.XATTR_ENTRY.pack(len(suffix), index, len(value)) + suffix + value
        out.append(ent.ljust(xattr_entry_size(suffix, value), b"\0"))
    return b"".join(out)


def _dir_blocks(entries: list[tuple[bytes, Node]]) -> tuple[list[int], int]:
    """Block boundaries (index of each block's first entry) and the directory's i_size."""
    starts, used = [0], 0
    for i, (name, _) in enumerate(entries):
        need = L.DIRENT.size + len(name)
        if used + need > BS:
            starts.append(i)
            used = 0
        used += need
    return starts, (len(starts) - 1) * BS + used


def _xattr_size(node: Node) -> int:
    """``len(_xattr_body(node))`` without building it (a plan keeps sizes, not copies of the xattrs)."""
    if not node.xattrs:
        return 0
    return L.XATTR_IBODY_HEADER.size + sum(xattr_entry_size(xattr_split(name)[1], value)
                                           for name, value in node.xattrs)


class _Plan:
    __slots__ = ("node", "xsize", "entries", "starts", "size", "layout", "inline", "blocks", "pos", "blkaddr")

    def __init__(self, node: Node) -> None:
        self.node = node
        self.xsize = _xattr_size(node)
        self.entries: list[tuple[bytes, Node]] | None = None
        self.starts: list[int] | None = None
        self.size = node.size
        self.layout = L.EROFS_INODE_FLAT_PLAIN
        self.inline = 0     # bytes of inline tail
        self.blocks = 0     # data blocks in the index
        self.pos = 0        # byte offset of the inode record
        self.blkaddr = NULL_ADDR32


def _plan(tree: Tree) -> tuple[list[_Plan], dict[int, int]]:
    """Unique inodes root first, breadth-first, names sorted; ``id(node) -> index``."""
    plans: list[_Plan] = []
    index: dict[int, int] = {}
    queue: deque[tuple[Node, Node]] = deque([(tree.root, tree.root)])
    index[id(tree.root)] = 0
    plans.append(_Plan(tree.root))
    while queue:
        d, parent = queue.popleft()
        entries = sorted([(b".", d), (b"..", parent), *d.extra.items()], key=lambda t: t[0])
        p = plans[index[id(d)]]
        p.entries = entries
        p.starts, p.size = _dir_blocks(entries)
        for name, child in entries:
            if name in (b".", b"..") or id(child) in index:
                continue
            index[id(child)] = len(plans)
            plans.append(_Plan(child))
            if child.kind == "dir":
                queue.append((child, d))
    return plans, index


def _layout(plans: list[_Plan]) -> int:
    """Choose layouts and positions; returns the index size."""
    pos = META_START
    for p in plans:
        if p.node.kind in ("dir", "symlink") and p.size:
            tail = p.size % BS
            if tail and L.INODE_EXTENDED.size + p.xsize + tail <= BS:
                p.layout, p.inline, p.blocks = L.EROFS_INODE_FLAT_INLINE, tail, p.size // BS
            else:
                p.blocks = -(-p.size // BS)
        rec = L.INODE_EXTENDED.size + p.xsize + p.inline
        pos = -(-pos // (1 << L.EROFS_ISLOTBITS)) << L.EROFS_ISLOTBITS
        if rec <= BS and pos % BS + rec > BS:
            pos = -(-pos // BS) * BS
        p.pos = pos
        pos += rec
    blk = -(-pos // BS)
    for p in plans:
        if p.blocks:
            p.blkaddr = blk
            blk += p.blocks
    return blk * BS


def _data(p: _Plan, nids: list[int], index: dict[int, int]) -> bytes:
    if p.node.kind == "symlink":
        return p.node.extra
    out = bytearray()
    starts = p.starts + [len(p.entries)]
    for b in range(len(starts) - 1):
        chunk = p.entries[starts[b]:starts[b + 1]]
        nameoff = L.DIRENT.size * len(chunk)
        recs, names = [], []
        for name, child in chunk:
            recs.append(L.DIRENT.pack(nids[index[id(child)]], nameoff, _FT[child.kind], 0))
            names.append(name)
            nameoff += len(name)
        blk = b"".join(recs) + b"".join(names)
        out += blk if b == len(starts) - 2 else blk.ljust(BS, b"\0")
    return bytes(out)


def build_index(tree: Tree, tar_size: int, *, uuid: bytes | None = None, build_time_ns: int | None = None) -> bytes:
    """The EROFS index for ``tree`` whose tar stream (``tar_size`` bytes) follows it on the device."""
    if tar_size < tree.tar_end:
        raise ImageError(f"tar_size {tar_size} is less than the end of the last member's data ({tree.tar_end})")
    if uuid is not None and len(uuid) != 16:
        raise ValueError("uuid must be 16 bytes")
    overlay_whiteouts(tree)
    plans, index = _plan(tree)
    size = _layout(plans)
    nids = [p.pos >> L.EROFS_ISLOTBITS for p in plans]
    blocks = (size + tar_size + BS - 1) // BS
    if blocks >= NULL_ADDR32:
        raise UnsupportedError(f"index + tar of {size + tar_size} bytes needs 48-bit block addresses")
    out = bytearray(size)
    newest = 0
    for i, p in enumerate(plans):
        n = p.node
        newest = max(newest, n.mtime_ns)
        u = p.blkaddr
        if n.kind == "reg" and n.size:
            if n.data_offset % BS:
                raise ImageError(f"regular file data at tar offset {n.data_offset} is not 512-aligned")
            u = (size + n.data_offset) >> BLKSZBITS
        elif n.kind in ("chr", "blk"):
            u = new_encode_dev(*n.extra)
        elif n.kind == "fifo":
            u = 0
        nlink = n.nlink
        if n.kind == "dir":   # ".", its name in the parent, and each subdirectory's ".."
            nlink = 2 + sum(c.kind == "dir" for name, c in p.entries if name not in (b".", b".."))
        sec, nsec = divmod(n.mtime_ns, 1_000_000_000)
        ifmt = L.EROFS_INODE_LAYOUT_EXTENDED | (p.layout << L.EROFS_I_DATALAYOUT_BIT)
        icount = (p.xsize - L.XATTR_IBODY_HEADER.size) // 4 + 1 if p.xsize else 0
        rec = L.INODE_EXTENDED.pack(ifmt, icount, _IFMT[n.kind] | n.mode, 0, p.size, u, i + 1, n.uid, n.gid,
                                    sec & ((1 << 64) - 1), nsec, nlink, bytes(16)) + _xattr_body(n)
        data = _data(p, nids, index) if n.kind in ("dir", "symlink") else b""
        if p.inline:
            rec += data[len(data) - p.inline:]
            data = data[:len(data) - p.inline]
        out[p.pos:p.pos + len(rec)] = rec
        if p.blocks:
            start = p.blkaddr * BS
            out[start:start + len(data)] = data
    if build_time_ns is None:
        build_time_ns = max(newest, 0)
    epoch, fixed_nsec = divmod(build_time_ns, 1_000_000_000)
    _superblock(out, nids[0], len(plans), epoch, fixed_nsec, blocks, bytes(16))
    if uuid is None:   # hashed in place: the index may be large, no copy of it
        digest = hashlib.sha256(out)
        digest.update(tar_size.to_bytes(8, "little"))
        h = bytearray(digest.digest()[:16])
        h[6] = (h[6] & 0x0F) | 0x80   # RFC 9562 version 8 (custom), variant 10
        h[8] = (h[8] & 0x3F) | 0x80
        uuid = bytes(h)
    _superblock(out, nids[0], len(plans), epoch, fixed_nsec, blocks, uuid)
    return bytes(out)


def _superblock(out: bytearray, root_nid: int, inos: int, epoch: int, fixed_nsec: int, blocks: int,
                uuid: bytes) -> None:
    if root_nid > 0xFFFF:   # pragma: no cover - the root is always the first record
        raise ImageError(f"root nid {root_nid} does not fit rootnid_2b")
    sb = L.SUPER_BLOCK.pack(
        L.EROFS_SUPER_MAGIC_V1, 0, L.EROFS_FEATURE_COMPAT_SB_CHKSUM, BLKSZBITS, 0, root_nid, inos, epoch,
        fixed_nsec, blocks, 0, 0, uuid, bytes(16), 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, bytes(2), 0, 0, 0, 0, 0)
    off = L.EROFS_SUPER_OFFSET
    out[off:off + SB_SIZE] = sb[:SB_SIZE]     # sb_extslots 0: the rest of the struct is inode space
    crc = crc32c_raw(0xFFFFFFFF, bytes(out[off:off + BS]))
    out[off + L.SB_CHECKSUM_OFFSET:off + L.SB_CHECKSUM_OFFSET + 4] = crc.to_bytes(4, "little")


def index_tar(chunks, *, max_entries: int = MAX_ENTRIES, uuid: bytes | None = None,
              build_time_ns: int | None = None) -> tuple[bytes, Tree]:
    """Parse a whole tar stream given as an iterable of byte chunks; ``(index, tree)``."""
    parser = TarParser()
    tree = Tree(max_entries=max_entries)
    for chunk in chunks:
        parser.feed(chunk)
        for m in parser.events():
            tree.add(m)
    parser.close()
    for m in parser.events():
        tree.add(m)
    return build_index(tree, parser.offset, uuid=uuid, build_time_ns=build_time_ns), tree
