"""erofs/metaranges.py: the byte ranges that must be local before a file-backed (fanotify) mount.

Each corpus image is walked twice through the pure reader, once over the whole image and once
over a reader that serves only the computed ranges and fails the test on any other byte: lstat
of every path (a lookup per component), readdir of every directory, every xattr listed and got,
every symlink read, and the block/extent map of every file (no file data).  Both walks must
give the same answers.  Dropping one block of the ranges must make the walk fail, so the
check can fail.
"""

from __future__ import annotations

import bisect
import os
import subprocess
import sys
from functools import cache

import pytest

from erofs_mount.erofs.image import Image
from erofs_mount.erofs.map import EROFS_MAP_META, map_blocks
from erofs_mount.erofs.metaranges import _Walk, coalesce, merge, metadata_ranges
from erofs_mount.erofs.zmap import ZEXT_META, ZMap
from erofs_mount.errors import ErofsMountError
from tests import corpuslib

OK = corpuslib.names(expect="ok")
REFUSE = corpuslib.names(expect="refuse")
# corrupt images whose damage is in metadata the walk reads: the function must refuse them
METADATA_DAMAGE = {"corrupt-bad-magic", "corrupt-sb-checksum", "corrupt-truncated", "corrupt-nid-out-of-range",
                   "corrupt-dirent-nameoff"}


class Missing(AssertionError):
    pass


class StrictSource:
    """A positional reader serving only the bytes inside ``ranges``; any other byte fails.

    The one exception is ``Image``'s first read, a 64 KiB head at offset 0 from which it
    decodes the superblock: it is served as the sparse backing file would hold it, with zeros
    where nothing is local (the walk comparison catches any use of those zeros).
    """

    def __init__(self, path, ranges) -> None:
        self.fd = os.open(path, os.O_RDONLY)
        self.size = os.fstat(self.fd).st_size
        self.starts = [off for off, _ in ranges]
        self.ends = [off + n for off, n in ranges]
        self.head = True

    def covered(self, start: int, end: int) -> bool:
        i = bisect.bisect_right(self.starts, start) - 1
        return i >= 0 and self.ends[i] >= end

    def __call__(self, off: int, n: int) -> bytes:
        data = os.pread(self.fd, n, off)
        if self.head and off == 0:
            self.head = False
            buf = bytearray(len(data))
            for s, e in zip(self.starts, self.ends):
                if s < len(buf):
                    buf[s:min(e, len(buf))] = data[s:min(e, len(buf))]
            return bytes(buf)
        end = min(off + n, self.size)
        if off < end and not self.covered(off, end):
            raise Missing(f"read of [{off}, {end}) outside the metadata ranges")
        return data

    def close(self) -> None:
        os.close(self.fd)


@cache
def _fd(path) -> int:
    return os.open(path, os.O_RDONLY)     # one per corpus file for the session


def _device_readers(ci):
    return [lambda off, n, fd=_fd(d): os.pread(fd, n, off) for d in ci.devices]


def open_full(name: str) -> Image:
    """A fresh Image over the whole image file (and its extra devices)."""
    ci = corpuslib.image(name)
    fd = _fd(ci.path)
    return Image(lambda off, n: os.pread(fd, n, off), size=os.fstat(fd).st_size, devices=_device_readers(ci))


def exact_spans(img: Image) -> list:
    """The unrounded ranges, without the superblock's (white box: it is the walk's first span)."""
    w = _Walk(img, True)
    w.run()
    assert w.spans[0][0] == 0
    return merge(w.spans[1:])


@cache
def ranges_of(name: str) -> tuple:
    return tuple(metadata_ranges(open_full(name)))


def _err(exc: ErofsMountError) -> str:
    return f"{type(exc).__name__}({exc.errno_name})"


def extent_map(img: Image, inode) -> list:
    """Every logical range of the file → its physical extent, reading no file data."""
    if inode.is_compressed:
        return [tuple(e) for e in img.zreader.extents(inode)]
    n = img.sb.extra_devices
    mask = (1 << n.bit_length()) - 1 if n else 0
    out, la = [], 0
    while la < inode.size:
        e = map_blocks(img.sb, inode, la, img.read_meta, mask)
        out.append((e.la, e.llen, e.pa, e.device, e.flags))
        assert e.la + e.llen > la
        la = e.la + e.llen
    return out


def walk(img: Image) -> dict:
    """What a metadata-only tour of the tree sees (paths found by readdir, then looked up)."""
    seen: dict[bytes, dict] = {}
    dirs, todo, visited = {}, [(b"/", img.root_nid)], set()
    while todo:     # readdir every directory
        path, nid = todo.pop()
        seen[path] = {"dirent_nid": nid}
        if not img.inode(nid).is_dir or nid in visited:
            continue
        visited.add(nid)
        ents = [(e.name, e.nid, e.file_type, e.next_pos) for e in img.iterdir(nid)]
        dirs[path] = ents
        base = path.rstrip(b"/") + b"/"
        todo += [(base + name, child) for name, child, _, _ in ents if name not in (b".", b"..")]
    for path, rec in seen.items():
        nid = img.resolve(path)     # lstat: a lookup per component
        assert nid == rec["dirent_nid"]
        ino = img.inode(nid)
        rec["stat"] = (ino.mode, ino.size, ino.nlink, ino.uid, ino.gid, ino.mtime, ino.mtime_nsec, ino.rdev,
                       ino.blocks, img.st_ino(nid))
        try:
            names = img.listxattr(nid)
        except ErofsMountError as exc:
            names, rec["listxattr"] = [], _err(exc)
        xattrs = {}
        for name in names:
            try:
                xattrs[name] = img.getxattr(nid, name)
            except ErofsMountError as exc:
                xattrs[name] = _err(exc)
        rec["xattrs"] = xattrs
        if ino.is_lnk:
            rec["link"] = img.readlink(nid)
        if ino.is_reg or ino.is_dir or ino.is_lnk:
            rec["extents"] = extent_map(img, ino)
        rec["readdir"] = dirs.get(path)
    return seen


@cache
def full_walk(name: str) -> dict:
    return walk(open_full(name))


def strict_walk(name: str, ranges) -> dict:
    ci = corpuslib.image(name)
    src = StrictSource(ci.path, ranges)
    try:
        return walk(Image(src, size=src.size, devices=_device_readers(ci)))
    finally:
        src.close()


# ---------------------------------------------------------------------------- the walk
@pytest.mark.parametrize("name", OK)
def test_walk_touches_only_the_ranges(name):
    ranges = ranges_of(name)
    bs = open_full(name).block_size
    assert ranges == tuple(merge(((o, o + n) for o, n in ranges), bs))     # sorted, merged, aligned
    assert all(off % bs == 0 and n % bs == 0 and n > 0 for off, n in ranges)
    want = full_walk(name)
    assert len(want) > 100
    assert strict_walk(name, ranges) == want


@pytest.mark.parametrize("name", OK)
def test_every_metadata_read_is_inside_the_exact_ranges(name, monkeypatch):
    """Byte-exact spans cover every byte the pure reader asks for as metadata, and the inline
    bytes the kernel reads with file data: a sharper check than whole blocks, where structures
    share blocks.  The superblock's span (the whole checksummed first block) is left out, so
    what follows it (compression configs, device slots, shared xattrs, prefixes) must be
    covered by its own span."""
    ci = corpuslib.image(name)
    exact = exact_spans(open_full(name))
    reads: list[tuple[str, int, int]] = []
    in_block = []
    meta, raw, block, zmeta = Image.read_meta, Image.read_raw, Image._read_meta_block, ZMap._meta

    def read_meta(self, pos, length, in_metabox=False):
        if not in_metabox and not (length == 4096 and pos % 4096 == 0):     # not a ZMap window
            reads.append(("meta", pos, length))
        return meta(self, pos, length, in_metabox)

    def read_meta_block(self, blk, in_mbox):
        in_block.append(1)      # whole-block reads of read_meta's cache
        try:
            return block(self, blk, in_mbox)
        finally:
            in_block.pop()

    def read_raw(self, pos, length, device=0):
        if not device and not in_block:
            reads.append(("raw", pos, length))
        return raw(self, pos, length, device)

    def z_meta(self, pos, n):
        if not self.nid >> 63:
            reads.append(("zindex", pos, n))
        return zmeta(self, pos, n)

    monkeypatch.setattr(Image, "read_meta", read_meta)
    monkeypatch.setattr(Image, "_read_meta_block", read_meta_block)
    monkeypatch.setattr(Image, "read_raw", read_raw)
    monkeypatch.setattr(ZMap, "_meta", z_meta)
    fd = _fd(ci.path)
    size = os.fstat(fd).st_size

    def source(off, n):
        if off and not in_block and not reads_started:     # Image.__init__: the device table
            reads.append(("init", off, n))
        return os.pread(fd, n, off)

    reads_started = False
    img = Image(source, size=size, devices=_device_readers(ci))
    reads_started = True
    walk(img)
    for path, rec in full_walk(name).items():
        if not rec["dirent_nid"] >> 63:     # in the metabox: its data is in the ranges whole
            for ext in rec.get("extents", ()):
                if len(ext) == 8 and ext[2] == ZEXT_META:       # ZExtent: la, llen, kind, pa, plen, ...
                    reads.append(("inline pcluster", ext[3], ext[4]))
                elif len(ext) == 5 and ext[4] & EROFS_MAP_META:  # la, llen, pa, device, flags
                    reads.append(("inline tail", ext[2], ext[1]))
    check = StrictSource(ci.path, exact)
    try:
        bad = [r for r in reads if r[1] < size and not check.covered(r[1], min(r[1] + r[2], size))]
    finally:
        check.close()
    assert reads and not bad, bad[:5]


@pytest.mark.parametrize("name, pick", [
    ("plain-inline-4k", "inode"),           # a file's inode (and its inline tail)
    ("plain-inline-4k", "dirdata"),         # a directory block
    ("blk-512", "inode"),
    ("chunk-4k-blockmap", "inode"),         # inode + chunk block map
    ("chunk-4k-blockmap", "last"),          # the last metadata block
    ("lz4", "inode"),                        # compact indexes follow the inode
    ("ztailpacking-lz4hc", "inode"),        # inline pclusters
    ("48bit-zstd", "inode"),                # extent records
    ("zdirs-lz4hc", "dirdata"),              # a compressed directory's pcluster / packed fragment
    ("metabox-lzma-lz4hc", "last"),         # metabox data
])
def test_dropping_a_block_is_caught(name, pick):
    img = open_full(name)
    bs = img.block_size
    ranges = ranges_of(name)
    if pick == "inode":
        path = max((p for p, r in full_walk(name).items() if r["stat"][0] & 0o170000 == 0o100000),
                   key=lambda p: (p.count(b"/"), p))
        blk = img.inode(img.resolve(path)).iloc // bs
    elif pick == "dirdata":
        without_dirs = metadata_ranges(img, include_dirs=False)
        extra = [b for off, n in ranges for b in range(off // bs, (off + n) // bs)
                 if not any(o <= b * bs < o + m for o, m in without_dirs)]
        assert extra, "include_dirs added nothing"
        blk = extra[len(extra) // 2]
    else:
        blk = (ranges[-1][0] + ranges[-1][1]) // bs - 1
    assert any(off <= blk * bs < off + n for off, n in ranges)
    assert blk > 0
    spans = [(o, min(o + n, blk * bs)) for o, n in ranges] + [(max(o, (blk + 1) * bs), o + n) for o, n in ranges]
    dropped = merge(spans, bs)
    assert sum(n for _, n in dropped) == sum(n for _, n in ranges) - bs
    with pytest.raises(Missing):
        strict_walk(name, dropped)


# ---------------------------------------------------------------------------- sizes and options
@pytest.mark.parametrize("name", OK)
def test_ranges_are_a_fraction_of_the_image(name):
    ci = corpuslib.image(name)
    size = os.path.getsize(ci.path)
    total = sum(n for _, n in ranges_of(name))
    assert total <= size
    if not ci.devices and size >= 1 << 20:     # with extra devices the primary is all metadata
        assert total < 0.4 * size, f"{total / size:.1%}"
    fewer = metadata_ranges(open_full(name), include_dirs=False)
    assert sum(n for _, n in fewer) <= total
    covered = StrictSource(ci.path, ranges_of(name))
    try:
        assert all(covered.covered(off, off + n) for off, n in fewer)
    finally:
        covered.close()


def test_align_to_pages_on_512_byte_blocks():
    img = open_full("blk-512")
    pages = metadata_ranges(img, align=4096)
    assert all(off % 4096 == 0 and (n % 4096 == 0 or off + n == img.size) for off, n in pages)
    blocks = ranges_of("blk-512")
    assert sum(n for _, n in blocks) < sum(n for _, n in pages)
    assert pages[0][0] == 0 and pages[0][1] >= 2048     # the superblock sits in the third 512-byte block


# ---------------------------------------------------------------------------- corrupt images
@pytest.mark.parametrize("name", REFUSE)
def test_corrupt_images_raise_the_projects_errors(name):
    try:
        ranges = metadata_ranges(open_full(name))
    except ErofsMountError:
        assert name in METADATA_DAMAGE
    else:   # damage the metadata walk never meets (a data pcluster, a directory cycle)
        assert name not in METADATA_DAMAGE
        assert ranges and ranges[0][0] == 0


# ---------------------------------------------------------------------------- merge / coalesce
def test_merge_rounds_clips_and_merges():
    assert merge([(5000, 5001), (0, 10), (4096, 4097), (9000, 9100)], 4096) == [(0, 12288)]
    assert merge([(10, 20), (8192, 8200)], 4096) == [(0, 4096), (8192, 4096)]
    assert merge([(8192, 9000), (100, 200)], 4096, size=8500) == [(0, 4096), (8192, 308)]
    assert merge([(5, 5), (7, 3)], 4096) == []
    assert merge([], 4096) == []


def test_coalesce():
    r = [(0, 4096), (8192, 4096), (20480, 4096), (24576, 4096)]
    assert coalesce(r, 0) == [(0, 4096), (8192, 4096), (20480, 8192)]
    assert coalesce(r, 4096) == [(0, 4096), (8192, 4096), (20480, 8192)]
    assert coalesce(r, 4097) == [(0, 12288), (20480, 8192)]
    assert coalesce(r, 1 << 20) == [(0, 28672)]
    assert coalesce(reversed(r), 4097) == coalesce(r, 4097)
    assert coalesce([(0, 100), (50, 10)], 0) == [(0, 100)]


def test_the_module_is_pure():
    code = ("import sys, erofs_mount.erofs.metaranges\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('trio', 'httpx', 'httpcore', 'pyfuse3', 'pyroute2', 'anyio', 'asyncio')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "[]", (r.stdout, r.stderr)
