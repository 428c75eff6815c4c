"""Byte ranges of an image the kernel reads as metadata: what must be local before mount(2).

For a file-backed mount (fanotify mode) the kernel's erofs driver reads the backing file
in two ways (Linux 6.18, ``fs/erofs``):

* the **data path**, ``vfs_iocb_iter_read`` on the backing file (``fileio.c``
  ``erofs_fileio_rq_submit``; compressed pclusters through ``erofs_fileio_submit_bio``):
  it passes ``rw_verify_area`` and raises fanotify pre-content events, so the daemon fetches
  those bytes on demand;
* the **metabuf path**, ``erofs_read_metabuf`` / ``erofs_init_metabuf`` + ``erofs_bread``
  (``data.c``) → ``read_mapping_folio`` on the backing file's page cache: no event, so bytes
  that are not local yet read as zeros, silently.

Metabuf readers (all must be local):

* superblock: ``super.c erofs_read_superblock`` (block 0; the checksum covers the rest of the
  first block); device slots: ``super.c erofs_init_device``; compression configurations
  after the superblock: ``decompressor.c z_erofs_parse_cfgs`` → ``super.c erofs_read_metadata``;
* inodes, compact or extended, also across a block boundary: ``inode.c erofs_read_inode``
  (64 bytes are taken for every slot, as the pure reader reads them: rarely one more block);
  fast symlinks (FLAT_INLINE, shorter than a block) are copied from that buffer
  (``inode.c erofs_fill_symlink``);
* the xattr ibody (header, shared ids, inline entries): ``xattr.c erofs_init_inode_xattrs``,
  ``erofs_xattr_iter_inline``; shared entries at ``xattr_blkaddr`` + 4 * id:
  ``erofs_xattr_iter_shared``; long name prefixes at mount: ``erofs_xattr_prefixes_init``
  (metabuf with PLAIN_XATTR_PFX, else the metabox or the packed inode's page cache);
* FLAT_INLINE tails (in the inode's metadata block): ``data.c erofs_map_blocks``
  (EROFS_MAP_META) read by ``fileio.c erofs_fileio_scan_folio`` / ``data.c erofs_iomap_begin``;
* chunk indexes / block maps: ``data.c erofs_map_blocks``;
* compressed files: the map header ``zmap.c z_erofs_fill_inode``, full and compacted
  lcluster indexes ``z_erofs_load_full_lcluster`` / ``z_erofs_load_compact_lcluster``,
  48-bit extent records ``z_erofs_map_blocks_ext``, ztailpacking inline pclusters
  ``zdata.c z_erofs_pcluster_begin`` (EROFS_MAP_META).

Through other page caches (hence the data path): directory blocks (``dir.c erofs_readdir``,
``namei.c erofs_find_target_block``: ``dir->i_mapping``), slow symlinks (``page_get_link``),
fragments (``zdata.c z_erofs_read_fragment``: the packed inode's mapping) and everything in
the metabox (``erofs_init_metabuf(.., in_metabox)`` uses the metabox inode's mapping).  The
metabox inode itself and its indexes are plain metadata; its data is included whole (it is
all metadata, and small).  Directory blocks and slow symlink targets, with the packed-inode
pclusters holding their fragments, are included with ``include_dirs`` (path walks need them;
prefetching them saves a round trip each).  Inodes are those reachable from the root, plus
the packed inode and the metabox inode.  Extra devices are out of scope.

The kernel reads whole folios, so ranges are rounded out to ``align`` (the block size by
default; 4096, the page cache's unit, is the cautious choice for sub-page blocks) and merged.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable

from ..errors import CorruptedError
from . import layout as L
from .inode import iloc
from .map import EROFS_MAP_MAPPED, EROFS_MAP_META, map_blocks
from .zmap import (EROFS_INODE_COMPRESSED_COMPACT, Z_EROFS_ADVISE_COMPACTED_2B, ZEXT_FRAGMENT, ZEXT_HOLE,
                   ZEXT_MAPPED, ZEXT_META, ZMap)

Range = tuple[int, int]   # (offset, length)
_BIG_PCLUSTER = L.EROFS_FEATURE_INCOMPAT_COMPR_CFGS    # the same bit


def metadata_ranges(image, *, include_dirs: bool = True, align: int | None = None,
                    prefetch: Callable[[list[Range]], None] | None = None) -> list[Range]:
    """Sorted, merged ``(offset, length)`` ranges of the primary device that must be local before
    mount(2), rounded out to ``align`` (default: the block size) and clipped to the image size.

    ``include_dirs``: also directory blocks and slow symlink targets (read on demand by the
    kernel, but every path walk needs them).  Reads only through ``image`` (an ``Image``);
    corrupt metadata raises the reader's ``ErofsMountError``.

    ``prefetch(ranges)``, if given, is told what the walk is about to read — the inodes of one
    directory level, then that level's directory blocks — so that a remote source can fetch them
    together (a few round trips per level instead of one per miss).  It only warms caches."""
    walk = _Walk(image, include_dirs, prefetch)
    walk.run()
    return merge(walk.spans, align or image.block_size, image.size)


def merge(spans: Iterable[tuple[int, int]], align: int = 1, size: int | None = None) -> list[Range]:
    """``(start, end)`` spans → sorted ``(offset, length)`` ranges rounded out to ``align``, clipped
    to ``size``, overlapping and adjacent ones merged."""
    out: list[list[int]] = []
    for start, end in sorted((s // align * align, -(-e // align) * align) for s, e in spans if e > s):
        if size is not None:
            end = min(end, size)
            if start >= end:
                continue
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(s, e - s) for s, e in out]


def coalesce(ranges: Iterable[Range], gap: int) -> list[Range]:
    """Merge ``(offset, length)`` ranges whose hole between them is shorter than ``gap`` bytes
    (overlapping and adjacent ones always): fewer requests for a few extra bytes."""
    out: list[list[int]] = []
    for off, length in sorted(ranges):
        if out and off - out[-1][1] < max(gap, 1):
            out[-1][1] = max(out[-1][1], off + length)
        else:
            out.append([off, off + length])
    return [(s, e - s) for s, e in out]


class _Walk:
    def __init__(self, image, include_dirs: bool, prefetch=None) -> None:
        self.img = image
        self.prefetch = prefetch
        self.sb = image.sb
        self.bs = image.block_size
        self.dirs = include_dirs
        self.spans: list[tuple[int, int]] = []
        self.seen_xattrs: set[int] = set()
        self.packed_exts: list[tuple] | None = None
        n = self.sb.extra_devices
        self.devmask = (1 << n.bit_length()) - 1 if n else 0

    def add(self, pos: int, length: int, in_mbox: bool = False) -> None:
        # metabox positions are offsets in the metabox inode's data, which run() adds whole
        if length > 0 and not in_mbox:
            self.spans.append((pos, pos + length))

    def u16(self, pos: int) -> int:
        raw = self.img.read_raw(pos, 2)
        if len(raw) != 2:
            raise CorruptedError(f"metadata at byte {pos} past the end of the image")
        return int.from_bytes(raw, "little")

    # ------------------------------------------------------------------ the whole image
    def run(self) -> None:
        img, sb, bs = self.img, self.sb, self.bs
        end = L.EROFS_SUPER_OFFSET + sb.sb_size
        if sb.has_compat(L.EROFS_FEATURE_COMPAT_SB_CHKSUM):     # erofs_superblock_csum_verify
            end = max(end, L.EROFS_SUPER_OFFSET + (bs - L.EROFS_SUPER_OFFSET if bs > L.EROFS_SUPER_OFFSET else bs))
        self.add(0, end)
        if sb.has_incompat(L.EROFS_FEATURE_INCOMPAT_COMPR_CFGS):
            pos = L.EROFS_SUPER_OFFSET + sb.sb_size
            for _ in range(bin(sb.available_compr_algs).count("1")):   # erofs_read_metadata records
                pos = (pos + 3) & ~3
                size = self.u16(pos) or 65536
                self.add(pos, 2 + size)
                pos += 2 + size
        if sb.extra_devices:
            self.add(sb.devt_slotoff * L.EROFS_DEVT_SLOT_SIZE, sb.extra_devices * L.EROFS_DEVT_SLOT_SIZE)
        if sb.packed_nid:
            self.inode_meta(img.inode(sb.packed_nid))
        if sb.has_metabox:
            mbox = img.inode(sb.metabox_nid)
            self.inode_meta(mbox)
            self.backing(mbox, 0, mbox.size)
        if sb.xattr_prefix_count:
            self.prefixes()
        # breadth first, one directory level at a time (what ``prefetch`` hears about)
        level, seen = [sb.root_nid], {sb.root_nid}
        while level:
            self._hint([(pos, L.INODE_EXTENDED.size) for pos, mb in (iloc(sb, nid) for nid in level) if not mb])
            dirs, mark = [], len(self.spans)
            for nid in level:
                inode = img.inode(nid)
                self.inode_meta(inode)
                if self.dirs and (inode.is_dir or inode.is_lnk):
                    self.backing(inode, 0, inode.size)
                if inode.is_dir:
                    dirs.append(inode)
            self._hint([(a, b - a) for a, b in self.spans[mark:]])
            level = []
            for inode in dirs:
                for ent in img.iterdir(inode.nid):
                    if ent.nid not in seen and ent.name not in (b".", b".."):
                        seen.add(ent.nid)
                        level.append(ent.nid)

    def _hint(self, ranges: list[Range]) -> None:
        if self.prefetch is not None and ranges:
            self.prefetch(ranges)

    def prefixes(self) -> None:
        """The long xattr name prefix table (erofs_xattr_prefixes_init)."""
        sb, img = self.sb, self.img
        start = pos = sb.xattr_prefix_start << 2
        owner = 0
        if not sb.has_compat(L.EROFS_FEATURE_COMPAT_PLAIN_XATTR_PFX):
            owner = sb.metabox_nid or sb.packed_nid     # neither: the kernel reads it plain
        for _ in range(sb.xattr_prefix_count):
            pos = (pos + 3) & ~3
            if owner:
                raw = img.read(owner, pos, 2)
                if len(raw) != 2:
                    raise CorruptedError("xattr prefix table truncated")
                pos += 2 + int.from_bytes(raw, "little")
            else:
                pos += 2 + self.u16(pos)
        if not owner:
            self.add(start, pos - start)
        elif not sb.metabox_nid:
            self.backing(img.inode(owner), start, pos)

    # ------------------------------------------------------------------ one inode
    def inode_meta(self, inode) -> None:
        """Every metabuf-read byte of ``inode``: the inode, its xattrs, inline tail or indexes."""
        mb, bs = inode.in_metabox, self.bs
        # 64 bytes even for a compact inode: the pure reader reads that much (the kernel reads
        # 32, then 32 more for an extended one): at most one more block, when the inode ends one
        self.add(inode.iloc, L.INODE_EXTENDED.size, mb)
        if inode.xattr_isize:
            self.xattrs(inode)      # shared entries may be outside the metabox
        if mb:
            return                  # the rest lies in the metabox, added whole
        layout, size, start = inode.datalayout, inode.size, inode.data_start
        if layout == L.EROFS_INODE_FLAT_INLINE and size:
            self.add(start, size - (-(-size // bs) - 1) * bs, mb)
        elif layout == L.EROFS_INODE_CHUNK_BASED:
            unit = L.CHUNK_INDEX.size if inode.chunkformat & L.EROFS_CHUNK_FORMAT_INDEXES \
                else L.EROFS_BLOCK_MAP_ENTRY_SIZE
            self.add(-(-start // unit) * unit, unit * -(-size >> inode.chunkbits), mb)
        elif inode.is_compressed:
            self.zindexes(inode)

    def xattrs(self, inode) -> None:
        img, sb, mb = self.img, self.sb, inode.in_metabox
        base = inode.iloc + inode.inode_isize
        hdr = img.read_meta(base, L.XATTR_IBODY_HEADER.size, mb)
        if len(hdr) < L.XATTR_IBODY_HEADER.size:
            raise CorruptedError(f"inode {inode.nid}: xattr body truncated")
        count = hdr[4]
        length = max(inode.xattr_isize, L.XATTR_IBODY_HEADER.size + 4 * count)
        self.add(base, length, mb)
        if sb.has_compat(L.EROFS_FEATURE_COMPAT_SHARED_EA_IN_METABOX):
            return      # shared entries live in the metabox, added whole
        ids = img.read_meta(base + L.XATTR_IBODY_HEADER.size, 4 * count, mb)
        shared = sb.xattr_blkaddr * self.bs
        for i in range(0, len(ids) - 3, 4):
            xid = int.from_bytes(ids[i:i + 4], "little")
            if xid in self.seen_xattrs:
                continue
            self.seen_xattrs.add(xid)
            pos = shared + 4 * xid
            ent = img.read_meta(pos, L.XATTR_ENTRY.size)
            if len(ent) < L.XATTR_ENTRY.size:
                raise CorruptedError(f"inode {inode.nid}: shared xattr {xid} past the end of the image")
            name_len, _, value_size = L.XATTR_ENTRY.unpack(ent)
            self.add(pos, L.XATTR_ENTRY.size + name_len + value_size)

    def zindexes(self, inode) -> None:
        """Map header, lcluster indexes or extent records, inline pcluster (zmap.c, zdata.c)."""
        img, sb, mb = self.img, self.sb, inode.in_metabox
        zm = ZMap(inode, sb.blkszbits, img.zreader.cfgs.available_compr_algs,
                  sb.has_incompat(_BIG_PCLUSTER), lambda p, n: img.read_meta(p, n, mb))
        self.add(zm.header_pos, 8, mb)
        if zm.all_fragments:
            return
        nlc = -(-inode.size >> zm.lclusterbits)
        if zm.extents >= 0:      # 48-bit extent records (z_erofs_map_blocks_ext)
            length = {4: 8 + 4 * nlc, 8: 8 * nlc}.get(zm.recsz, zm.extents * zm.recsz)
            self.add(zm.ext_pos, length, mb)
        elif inode.datalayout == EROFS_INODE_COMPRESSED_COMPACT:
            total = -(-inode.size // self.bs)       # erofs_iblks(): lcn < totalidx
            ebase = zm.header_pos + 8
            initial = ((32 - ebase % 32) // 4) & 7
            c2b = (total - initial) // 16 * 16 if zm.advise & Z_EROFS_ADVISE_COMPACTED_2B and initial < total else 0
            end = ebase + 4 * (total - c2b) + 2 * c2b
            self.add(ebase, -(-end // 8) * 8 - ebase, mb)     # 4b packs hold 2 lclusters in 8 bytes
        else:
            self.add(zm.header_pos + 16, 8 * nlc, mb)          # Z_EROFS_FULL_INDEX_START
        if zm.idata_size:
            self.add(zm.idataoff, zm.idata_size, mb)

    # ------------------------------------------------------------------ data backing
    def extents(self, inode) -> list[tuple[int, int, int, int, int, int]]:
        """``(la, llen, kind, pa, plen, fragmentoff)`` of every extent of ``inode`` (kind: ZEXT_*)."""
        if inode.is_compressed:
            return [(e.la, e.llen, e.kind, e.pa, e.plen, e.fragmentoff)
                    for e in self.img.zreader.extents(inode)]
        out, la = [], 0
        while la < inode.size:
            e = map_blocks(self.sb, inode, la, self.img.read_meta, self.devmask)
            n = min(inode.size, e.la + e.llen) - la
            if n <= 0:
                raise CorruptedError(f"inode {inode.nid}: empty extent at {la}")
            if e.flags & EROFS_MAP_META:
                kind = ZEXT_META
            elif e.flags & EROFS_MAP_MAPPED and not e.device:   # other devices: out of scope
                kind = ZEXT_MAPPED
            else:
                kind = ZEXT_HOLE
            out.append((la, n, kind, e.pa + la - e.la, n, 0))
            la += n
        return out

    def backing(self, inode, start: int, end: int) -> None:
        """Add the bytes that back logical ``[start, end)`` of ``inode`` (whole pclusters)."""
        packed = inode.nid == self.sb.packed_nid
        if packed:
            if self.packed_exts is None:
                self.packed_exts = self.extents(inode)
            exts = self.packed_exts
        else:
            exts = self.extents(inode)
        i = max(bisect.bisect_right(exts, (start,)) - 1, 0)
        for la, llen, kind, pa, plen, fragoff in exts[i:]:
            if la >= end:
                break
            if la + llen <= start:
                continue
            lo, hi = max(start, la), min(end, la + llen)
            if kind in (ZEXT_MAPPED, ZEXT_META):
                if inode.is_compressed:     # a pcluster is decoded whole
                    self.add(pa, plen, kind == ZEXT_META and inode.in_metabox)
                else:
                    self.add(pa + lo - la, hi - lo, kind == ZEXT_META and inode.in_metabox)
            elif kind == ZEXT_FRAGMENT:
                if packed or not self.sb.packed_nid:
                    raise CorruptedError(f"inode {inode.nid}: fragment but no packed inode")
                self.backing(self.img.inode(self.sb.packed_nid), fragoff + lo - la, fragoff + hi - la)
