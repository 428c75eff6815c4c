"""The sequential mapper (``ZMap.map_run`` and its compacted-index fast path) equals ``ZMap.map``
called at each extent start: same extents, same first error (class, errno, message).

On every compressed corpus image and the embedded newer-mkfs images (all layouts: full,
compact 2b/4b, big pclusters, 48-bit extents, fragments, ztailpacking, interlaced), on their
index bytes mutated in place, and on hand-built compacted indexes (hypothesis) with every
quirk the fast path has to step aside for.
"""

from __future__ import annotations

import os
import random
import struct
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from erofs_mount.erofs import zmap as Z
from erofs_mount.erofs.image import Image
from erofs_mount.errors import ErofsMountError
from tests import corpuslib

HEAD1, NONHEAD, PLAIN, HEAD2 = Z.Z_EROFS_LCLUSTER_TYPE_HEAD1, Z.Z_EROFS_LCLUSTER_TYPE_NONHEAD, \
    Z.Z_EROFS_LCLUSTER_TYPE_PLAIN, Z.Z_EROFS_LCLUSTER_TYPE_HEAD2
CBLK = Z.Z_EROFS_LI_D0_CBLKCNT
CORPUS = ["lz4", "lz4hc-pcluster-64k", "lzma-pcluster-1m", "deflate", "zstd", "mkfs15-legacy-lz4hc",
          "ztailpacking-lz4hc", "fragments-dedupe-lz4hc", "48bit-zstd", "zdirs-lz4hc", "metabox-lzma-lz4hc",
          "compact-allroot-lz4", "xattr-prefix-nofilter-lz4", "corrupt-base-lz4hc", "corrupt-truncated",
          "corrupt-pcluster-garbage"]


def _sig(exc: ErofsMountError) -> tuple:
    return type(exc), exc.errno, str(exc)


def per_extent(zm: Z.ZMap, la: int, end: int) -> tuple[list, tuple | None]:
    """The reference: ``map`` at ``la``, then at each extent's end."""
    out: list = []
    try:
        while la < min(end, zm.size):
            ext = zm.map(la)
            assert ext.la <= la < ext.la + ext.llen
            out.append(ext)
            la = ext.la + ext.llen
    except ErofsMountError as exc:
        return out, _sig(exc)
    return out, None


def run(zm: Z.ZMap, la: int, end: int) -> tuple[list, tuple | None]:
    out: list = []
    try:
        zm.map_run(la, end, out)
    except ErofsMountError as exc:
        return out, _sig(exc)
    return out, None


def fast_prefix(zm: Z.ZMap, la: int, end: int) -> list:
    """What the compacted fast path alone appends from ``la`` (it never raises)."""
    out: list = []
    stop = zm._run_fast(la, end, out)
    assert stop == (out[-1].la + out[-1].llen if out else la)
    return out


# ---------------------------------------------------------------------------- real images

def _walk(img: Image):
    stack, seen = [img.root_nid], set()
    while stack:
        nid = stack.pop()
        try:
            entries = list(img.iterdir(nid))
        except ErofsMountError:
            continue
        for e in entries:
            if e.name in (b".", b"..") or e.nid in seen:
                continue
            seen.add(e.nid)
            try:
                ino = img.inode(e.nid)
            except ErofsMountError:
                continue
            if ino.is_dir:
                stack.append(e.nid)
            elif ino.is_compressed and ino.size:
                yield ino


def _zmap(img: Image, ino, read_meta=None) -> Z.ZMap | tuple:
    rm = read_meta or (lambda pos, n: img.read_meta(pos, n, ino.in_metabox))
    try:
        return Z.ZMap(ino, img.sb.blkszbits, img.zreader.cfgs.available_compr_algs,
                      bool(img.sb.feature_incompat & 0x2), rm)
    except ErofsMountError as exc:
        return _sig(exc)


def _corpus_image(name: str) -> tuple[Image, int]:
    try:
        ci = corpuslib.image(name)
    except (KeyError, FileNotFoundError) as exc:
        pytest.skip(f"corpus image {name} not available: {exc}")
    fd = os.open(ci.path, os.O_RDONLY)
    return Image(lambda pos, n: os.pread(fd, n, pos), size=os.fstat(fd).st_size), fd


def _embedded() -> dict[str, bytes]:
    from tests.unit.test_znewmkfs import images
    return images()


def _check_inodes(img: Image, rng: random.Random, mutate: bool = False) -> int:
    """Compare the two mappers on every compressed inode; returns how many extents the fast path made."""
    fast = 0
    for ino in _walk(img):
        ref_zm = _zmap(img, ino)
        if isinstance(ref_zm, tuple):
            assert _zmap(img, ino) == ref_zm
            continue
        # whole file, and a few ranges starting anywhere
        assert run(_zmap(img, ino), 0, ino.size) == per_extent(ref_zm, 0, ino.size), ino.nid
        for _ in range(3):
            la = rng.randrange(ino.size)
            end = la + rng.choice([1, 4096, 1 << 17, 1 << 30])
            assert run(_zmap(img, ino), la, end) == per_extent(_zmap(img, ino), la, end), (ino.nid, la)
        if not ref_zm.all_fragments and ref_zm.extents < 0:
            got = fast_prefix(_zmap(img, ino), 0, ino.size)
            assert got == per_extent(_zmap(img, ino), 0, ino.size)[0][:len(got)]
            fast += len(got)
        if mutate and ref_zm.layout in (Z.EROFS_INODE_COMPRESSED_COMPACT, Z.EROFS_INODE_COMPRESSED_FULL):
            _check_mutations(img, ino, ref_zm, rng)
    return fast


def _check_mutations(img: Image, ino, zm: Z.ZMap, rng: random.Random) -> None:
    """Flip bytes of the inode's index (header and lcluster records), compare the mappers."""
    nidx = -(-ino.size >> img.sb.blkszbits)
    span = 8 + 8 + nidx * 8     # an upper bound of either index form
    for _ in range(4):
        flips = {zm.header_pos + rng.randrange(span): rng.randrange(1, 256) for _ in range(rng.randrange(1, 4))}

        def rm(pos, n, flips=flips):
            data = bytearray(img.read_meta(pos, n, ino.in_metabox))
            for p, x in flips.items():
                if pos <= p < pos + len(data):
                    data[p - pos] ^= x
            return bytes(data)
        a, b = _zmap(img, ino, rm), _zmap(img, ino, rm)
        if isinstance(a, tuple):
            assert a == b
            continue
        assert run(a, 0, ino.size) == per_extent(b, 0, ino.size), (ino.nid, flips)


@pytest.mark.parametrize("name", CORPUS)
def test_corpus_images(name):
    img, fd = _corpus_image(name)
    try:
        fast = _check_inodes(img, random.Random(name), mutate=True)
    finally:
        os.close(fd)
    if name in ("lz4", "lz4hc-pcluster-64k", "corrupt-base-lz4hc", "compact-allroot-lz4", "ztailpacking-lz4hc",
                "mkfs15-legacy-lz4hc"):
        assert fast > 0, "the compacted fast path was never taken"


def test_embedded_newer_mkfs_images():
    for name, data in sorted(_embedded().items()):
        img = Image(lambda pos, n, data=data: data[pos:pos + n], size=len(data))
        _check_inodes(img, random.Random(name), mutate=True)


# ---------------------------------------------------------------------------- hand-built compacted indexes

def _compact_meta(entries: list[tuple[int, int]], bases: list[int], hdr_pos: int, lcb: int, advise: int,
                  blkszbits: int, size: int, algs: int = 0, fix_last: bool = True) -> bytes:
    """Inode bytes up to ``hdr_pos``, the map header, then the packs ZMap expects for ``entries``."""
    lobits = max(lcb, 12)
    ebase = hdr_pos + 8
    totalidx = -(-size >> blkszbits)
    c4 = ((32 - ebase % 32) // 4) & 7
    c2b = (totalidx - c4) // 16 * 16 if advise & Z.Z_EROFS_ADVISE_COMPACTED_2B and c4 < totalidx else 0
    out, k, b = [], 0, 0
    entries = list(entries)
    while k < len(entries):
        vcnt = 16 if c4 <= k < c4 + c2b else 2
        last = k + vcnt - 1     # a NONHEAD last in its pack stores delta[1] (unless it holds a CBLKCNT)
        if last < len(entries) and entries[last][0] == NONHEAD and not entries[last][1] & CBLK and fix_last:
            nxt = next((x for x in range(last + 1, len(entries)) if entries[x][0] != NONHEAD), len(entries))
            entries[last] = (NONHEAD, nxt - last)
        size_ = vcnt * (2 if vcnt == 16 else 4)
        encodebits = (size_ - 4) * 8 // vcnt
        bits = 0
        for j, (t, lo) in enumerate(entries[k:k + vcnt]):
            bits |= (((t << lobits) | (lo & ((1 << lobits) - 1))) & ((1 << encodebits) - 1)) << (encodebits * j)
        out.append(bits.to_bytes(size_ - 4, "little") + struct.pack("<I", bases[b % len(bases)]))
        k += vcnt
        b += 1
    hdr = struct.pack("<IHBB", 0, advise, algs, lcb - blkszbits)
    return bytes(hdr_pos) + hdr + b"".join(out)


@st.composite
def compact_cases(draw):
    blkszbits = draw(st.sampled_from([9, 12]))
    lcb = blkszbits + draw(st.sampled_from([0, 0, 1]))
    n = draw(st.integers(1, 70))
    size = (n - 1 << lcb) + draw(st.integers(1, 1 << lcb))
    advise = 0
    if draw(st.booleans()):
        advise |= Z.Z_EROFS_ADVISE_COMPACTED_2B
    big = draw(st.integers(0, 3)) == 0
    if big:
        advise |= Z.Z_EROFS_ADVISE_BIG_PCLUSTER_1 | Z.Z_EROFS_ADVISE_BIG_PCLUSTER_2
    if draw(st.integers(0, 4)) == 0:
        advise |= Z.Z_EROFS_ADVISE_INTERLACED_PCLUSTER
    tail = draw(st.sampled_from([0, 0, 0, Z.Z_EROFS_ADVISE_INLINE_PCLUSTER, Z.Z_EROFS_ADVISE_FRAGMENT_PCLUSTER]))
    head2 = draw(st.booleans())
    lc = 1 << lcb
    entries: list[tuple[int, int]] = []
    valid = draw(st.booleans())
    while valid and len(entries) < n + 17:      # pclusters as mkfs lays them out
        k = draw(st.integers(1, 5))
        t = draw(st.sampled_from([HEAD1, HEAD1, HEAD1, HEAD2 if head2 else HEAD1, PLAIN if k == 1 else HEAD1]))
        entries.append((t, draw(st.sampled_from([0, 0, 0, 1, 100, lc - 1])) if entries else 0))
        for d in range(1, k):
            entries.append((NONHEAD, CBLK | draw(st.integers(1, k)) if big and d == 1 else d))
    while len(entries) < n + 17:                # anything
        t = draw(st.sampled_from([HEAD1, HEAD1, HEAD1, NONHEAD, NONHEAD, NONHEAD, PLAIN, HEAD2 if head2 else HEAD1]))
        if t == NONHEAD:
            lo = draw(st.sampled_from([1, 1, 1, 2, 3, 0, CBLK | 2, CBLK | 3, CBLK, draw(st.integers(0, 1 << 13))]))
        else:
            lo = draw(st.sampled_from([0, 0, 0, 100, lc - 1, lc, draw(st.integers(0, 1 << 13))]))
        entries.append((t, lo))
    bases = draw(st.lists(st.integers(0, 1 << 20), min_size=1, max_size=4))
    hdr_pos = draw(st.sampled_from([32, 40, 48, 56, 64, 96]))
    # HEAD2 with algorithm id 3 (zstd), which the superblock's set sometimes lacks
    meta = bytearray(_compact_meta(entries, bases, hdr_pos, lcb, advise | tail, blkszbits, size, 0x30 if head2 else 0,
                                   fix_last=valid))
    if tail == Z.Z_EROFS_ADVISE_INLINE_PCLUSTER:
        meta[hdr_pos + 2:hdr_pos + 4] = struct.pack("<H", draw(st.integers(1, 200)))
    elif tail:
        meta[hdr_pos:hdr_pos + 4] = struct.pack("<I", draw(st.integers(0, 1 << 20)))
    meta += bytes(300 if tail else 0)
    for _ in range(draw(st.integers(0, 1 if valid else 3))):    # stray corruption
        p = draw(st.integers(hdr_pos, len(meta) - 1))
        meta[p] ^= draw(st.integers(1, 255))
    if draw(st.integers(0, 20 if valid else 6)) == 0:     # index cut short
        meta = meta[:draw(st.integers(hdr_pos + 8, len(meta)))]
    algs = draw(st.sampled_from([0b1, 0b1001]))
    return bytes(meta), hdr_pos, size, blkszbits, algs, big or draw(st.booleans())


def _synthetic(case, layout: int = Z.EROFS_INODE_COMPRESSED_COMPACT) -> tuple:
    meta, hdr_pos, size, blkszbits, algs, big_sb = case
    ino = SimpleNamespace(nid=5, size=size, datalayout=layout, iloc=0,
                          inode_isize=hdr_pos, xattr_isize=0, in_metabox=False)

    def make():
        try:
            return Z.ZMap(ino, blkszbits, algs, big_sb, lambda pos, n: meta[pos:pos + n])
        except ErofsMountError as exc:
            return _sig(exc)
    return make, size


def _check_synthetic(make, size: int, seed: int) -> None:
    """``map_run`` == per-extent ``map`` over the whole file and 4 random ranges (``make()``: a fresh
    ZMap, or the same error tuple every time); the fast walk alone gives a prefix of the same."""
    zm = make()
    if isinstance(zm, tuple):
        assert make() == zm
        return
    assert run(make(), 0, size) == per_extent(make(), 0, size)
    rng = random.Random(seed)
    for _ in range(4):
        la = rng.randrange(size)
        end = la + rng.choice([1, 1000, 1 << 16, 1 << 30])
        assert run(make(), la, end) == per_extent(make(), la, end)
        if not zm.all_fragments:
            got = fast_prefix(make(), la, end)
            assert got == per_extent(make(), la, end)[0][:len(got)]


@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(compact_cases(), st.integers(0, 1 << 30))
def test_compact_indexes_match_per_extent(case, seed):
    _check_synthetic(*_synthetic(case), seed)


# ---------------------------------------------------------------------------- hand-built full indexes

@st.composite
def full_cases(draw):
    blkszbits = draw(st.sampled_from([9, 12]))
    lcb = blkszbits + draw(st.sampled_from([0, 0, 1, 3]))
    n = draw(st.integers(1, 60))
    size = (n - 1 << lcb) + draw(st.integers(1, 1 << lcb))
    advise = 0
    big1, big2 = draw(st.integers(0, 3)) == 0, draw(st.integers(0, 3)) == 0
    advise |= Z.Z_EROFS_ADVISE_BIG_PCLUSTER_1 if big1 else 0
    advise |= Z.Z_EROFS_ADVISE_BIG_PCLUSTER_2 if big2 else 0
    if draw(st.integers(0, 4)) == 0:
        advise |= Z.Z_EROFS_ADVISE_INTERLACED_PCLUSTER
    tail = draw(st.sampled_from([0, 0, 0, Z.Z_EROFS_ADVISE_INLINE_PCLUSTER, Z.Z_EROFS_ADVISE_FRAGMENT_PCLUSTER]))
    head2 = draw(st.booleans())
    lc = 1 << lcb
    recs: list[bytes] = []
    valid = draw(st.booleans())

    def head(t, co):
        return struct.pack("<HHI", t | (Z.Z_EROFS_LI_PARTIAL_REF if draw(st.integers(0, 5)) == 0 else 0), co,
                           draw(st.integers(0, 1 << 24)))
    while valid and len(recs) < n + 3:
        k = draw(st.integers(1, 5))
        t = draw(st.sampled_from([HEAD1, HEAD1, HEAD2 if head2 else HEAD1, PLAIN if k == 1 else HEAD1]))
        recs.append(head(t, draw(st.sampled_from([0, 0, 0, 1, 100, lc - 1])) if recs else 0))
        for d in range(1, k):
            big = big1 if t == HEAD1 else big2
            d0 = CBLK | draw(st.integers(0, k)) if big and d == 1 else d
            recs.append(struct.pack("<HHHH", NONHEAD, 0, d0, k - d))
    while len(recs) < n + 3:
        t = draw(st.sampled_from([HEAD1, HEAD1, NONHEAD, NONHEAD, NONHEAD, PLAIN, HEAD2 if head2 else HEAD1]))
        if t == NONHEAD:
            d0 = draw(st.sampled_from([1, 1, 2, 0, CBLK | 2, CBLK, draw(st.integers(0, 0xFFFF))]))
            recs.append(struct.pack("<HHHH", NONHEAD, 0, d0, draw(st.sampled_from([1, 1, 2, 0, 70000 & 0xFFFF]))))
        else:
            recs.append(head(t, draw(st.sampled_from([0, 0, 100, lc - 1, lc, draw(st.integers(0, 0xFFFF))]))))
    hdr_pos = draw(st.sampled_from([32, 40, 64]))
    first = 0
    if tail == Z.Z_EROFS_ADVISE_INLINE_PCLUSTER:
        first = draw(st.integers(1, 200)) << 16
    elif tail:
        first = draw(st.integers(0, 1 << 20))
    hdr = struct.pack("<IHBB", first, advise | tail, 0x30 if head2 else 0, lcb - blkszbits)
    meta = bytearray(bytes(hdr_pos) + hdr + bytes(8) + b"".join(recs) + bytes(300 if tail else 0))
    for _ in range(draw(st.integers(0, 1 if valid else 3))):    # stray corruption
        p = draw(st.integers(hdr_pos, len(meta) - 1))
        meta[p] ^= draw(st.integers(1, 255))
    if draw(st.integers(0, 20 if valid else 6)) == 0:     # index cut short
        meta = meta[:draw(st.integers(hdr_pos + 8, len(meta)))]
    algs = draw(st.sampled_from([0b1, 0b1001]))
    return bytes(meta), hdr_pos, size, blkszbits, algs, big1 or big2 or draw(st.booleans())


@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(full_cases(), st.integers(0, 1 << 30))
def test_full_indexes_match_per_extent(case, seed):
    _check_synthetic(*_synthetic(case, Z.EROFS_INODE_COMPRESSED_FULL), seed)


def test_synthetic_cases_take_the_fast_path_and_step_aside():
    """The generator is not vacuous: valid runs go fast, and the quirks make it stop."""
    lc = 4096
    # lclusters: H N N | H(+100) N | P | H | H ... (28 lclusters, 25 extents)
    entries = [(HEAD1, 0), (NONHEAD, 1), (NONHEAD, 2), (HEAD1, 100), (NONHEAD, 1), (PLAIN, 0), (HEAD1, 0),
               (HEAD1, 0)] + [(HEAD1, 0)] * 20
    size = 28 * lc
    meta = _compact_meta(entries, [1000], 32, 12, Z.Z_EROFS_ADVISE_COMPACTED_2B, 12, size)
    make, _ = _synthetic((meta, 32, size, 12, 0b1, False))
    got = fast_prefix(make(), 0, size)
    assert got == per_extent(make(), 0, size)[0] and len(got) == 25
    assert [e.la for e in got[:4]] == [0, 3 * lc + 100, 5 * lc, 6 * lc]
    assert got[2].alg == 4      # shifted (plain)
    # NONHEAD with a CBLKCNT in a non-big image: the fast path stops, map() raises
    bad = _compact_meta([(HEAD1, 0), (NONHEAD, CBLK | 2)] + [(HEAD1, 0)] * 6, [1], 32, 12, 0, 12, 8 * lc)
    make, _ = _synthetic((bad, 32, 8 * lc, 12, 0b1, False))
    assert fast_prefix(make(), 0, 8 * lc) == []
    out, err = run(make(), 0, 8 * lc)
    assert out == [] and err is not None and "CBLKCNT" in err[2]


# ---------------------------------------------------------------------------- zdata: grouping of raw reads

def _prefetch_reference(exts, wanted, read):
    """The per-request grouping of adjacent small uncached pclusters, as first written (a dict)."""
    from erofs_mount.erofs.zdata import _PREFETCH_BYTES, _PREFETCH_MAX_PCLUSTER
    cand = [i for i in wanted if exts[i].kind == Z.ZEXT_MAPPED and exts[i].plen <= _PREFETCH_MAX_PCLUSTER]
    raws, k = {}, 0
    while k < len(cand):
        prev = exts[cand[k]]
        j, total = k + 1, prev.plen
        while j < len(cand):
            ext = exts[cand[j]]
            if prev.pa + prev.plen != ext.pa or total + ext.plen > _PREFETCH_BYTES:
                break
            total += ext.plen
            prev = ext
            j += 1
        if j - k > 1:
            first = exts[cand[k]].pa
            try:
                raw = read(first, total)
            except ErofsMountError:
                raw = b""
            if len(raw) == total:
                for i in cand[k:j]:
                    ext = exts[i]
                    raws[i] = raw[ext.pa - first:ext.pa - first + ext.plen]
        k = j
    return raws


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(st.lists(st.tuples(st.sampled_from([Z.ZEXT_MAPPED, Z.ZEXT_MAPPED, Z.ZEXT_META, Z.ZEXT_HOLE]),
                          st.sampled_from([4096, 4096, 8192, 65536, 1 << 20]), st.booleans(), st.booleans()),
                max_size=40),
       st.integers(0, 1 << 16))
def test_prefetch_groups_like_before(specs, limit):
    from erofs_mount.erofs.zdata import ZReader
    exts, wanted, pa = [], [], 1 << 20
    for i, (kind, plen, gap, cached) in enumerate(specs):
        pa += 4096 if gap else 0
        exts.append(Z.ZExtent(i * 8192, 8192, kind, pa, plen, 0))
        pa += plen
        if kind != Z.ZEXT_HOLE and not cached:
            wanted.append(i)
    device = bytes(range(256)) * ((pa + 4096) // 256 + 1)

    def read(pos, n):   # a device whose readable bytes end at `limit` pages past 1 MiB
        return device[pos:min(pos + n, (1 << 20) + limit * 4096)]
    calls_new, calls_old = [], []
    stub = SimpleNamespace(_read_pcluster=lambda pos, n: calls_new.append((pos, n)) or read(pos, n))
    new = ZReader._prefetch(stub, exts, wanted)
    old = _prefetch_reference(exts, wanted, lambda pos, n: calls_old.append((pos, n)) or read(pos, n))
    assert calls_new == calls_old
    assert {i: r for i, r in enumerate(new or []) if r is not None} == old
