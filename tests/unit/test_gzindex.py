"""gzip random access (erofs_mount/gzindex): builder, range reads, zinfo, erofs-utils interop, damage."""

from __future__ import annotations

import ctypes
import gzip
import io
import os
import random
import shutil
import struct
import subprocess
import sys
import tarfile
import time
import tracemalloc
import zlib

import pytest

from erofs_mount.errors import CorruptedError
from erofs_mount.gzindex import (GzIndex, GzIndexBuilder, RangeInflater, from_zinfo, read_range, to_sidecar,
                                 to_zinfo)
from erofs_mount.gzindex.index import ZINFO_CKPT_SIZE, ZINFO_HEADER
from erofs_mount.gzindex.zlibc import WBITS_GZIP, Inflater, z_stream

MKFS = os.environ.get("EROFS_MKFS_NEW", "")   # a mkfs.erofs >= 1.8 (--tar=i --gzinfo); Debian 12 has 1.5


def make_data(seed: int, size: int) -> bytes:
    """Alternating compressible text and random runs (stored blocks, bits at odd positions)."""
    rnd = random.Random(seed)
    words = [bytes(rnd.choice(b"etaoinshrdlu ") for _ in range(rnd.randint(1, 12))) for _ in range(800)]
    parts, n = [], 0
    while n < size:
        if rnd.random() < 0.7:
            p = b" ".join(rnd.choices(words, k=rnd.randint(100, 20000)))
        else:
            p = rnd.randbytes(rnd.randint(1, 60000))
        parts.append(p)
        n += len(p)
    return b"".join(parts)[:size]


DATA = make_data(1, 4_000_000)


def build(gz: bytes, span: int, chunks=None) -> tuple[bytes, GzIndex]:
    b = GzIndexBuilder(span)
    out = []
    if chunks is None:
        out.extend(b.feed(gz))
    else:
        pos = 0
        for n in chunks:
            out.extend(b.feed(gz[pos:pos + n]))
            pos += n
        assert pos >= len(gz)
    return b"".join(out), b.finish()


def random_chunks(seed: int, total: int, top: int = 200_000):
    rnd = random.Random(seed)
    out, n = [], 0
    while n < total:
        out.append(rnd.randint(1, top))
        n += out[-1]
    return out


def check_reads(index: GzIndex, gz: bytes, data: bytes, seed: int, count: int = 200, extra=()) -> None:
    rnd = random.Random(seed)
    pread = lambda off, n: gz[off:off + n]  # noqa: E731
    reqs = [(rnd.randrange(len(data) + 1), rnd.choice([0, 1, 4096, rnd.randrange(300_000)])) for _ in range(count)]
    reqs += [(c.out_offset, 4096) for c in index.checkpoints] + [(c.out_offset - 1, 2) for c in index.checkpoints]
    reqs += [(len(data) - 1, 1), (len(data) - 1, 100), (len(data), 10), (0, 0), (0, len(data)), *extra]
    for off, n in reqs:
        off = max(off, 0)
        assert read_range(index, off, n, pread) == data[off:off + n], (off, n)


def multi_member(data: bytes, pieces: int = 7) -> bytes:
    cut = sorted(random.Random(3).sample(range(1, len(data)), pieces - 1))
    bounds = [0, *cut, len(data)]
    return b"".join(gzip.compress(data[a:b], 6) for a, b in zip(bounds, bounds[1:])) + gzip.compress(b"")


# ---- building -------------------------------------------------------------------------------------

@pytest.mark.parametrize("level", [1, 6, 9])
@pytest.mark.parametrize("span", [64 << 10, 1 << 20, 4 << 20])
def test_python_gzip_levels(level, span):
    gz = gzip.compress(DATA, level)
    out, idx = build(gz, span, random_chunks(level, len(gz)))
    assert out == DATA
    assert (idx.uncompressed_size, idx.compressed_size) == (len(DATA), len(gz))
    assert idx.checkpoints[0].out_offset == 0 and idx.checkpoints[0].window == b""
    cps = idx.checkpoints                        # block ends at least a span apart (blocks can be longer)
    assert all(b.out_offset - a.out_offset >= span for a, b in zip(cps, cps[1:]))
    assert len(cps) <= len(DATA) // span + 1
    assert all(len(c.window) == min(32768, c.out_offset) for c in idx.checkpoints[1:])
    if span == 64 << 10:
        assert {c.bits for c in idx.checkpoints} - {0}, "expected checkpoints inside a byte"
        check_reads(idx, gz, DATA, seed=level)


def test_one_byte_feeds_and_whole():
    data = DATA[:150_000]
    gz = gzip.compress(data, 6) + gzip.compress(data[:5000], 9)
    out1, idx1 = build(gz, 16 << 10, [1] * len(gz))
    out2, idx2 = build(gz, 16 << 10)
    assert out1 == out2 == data + data[:5000]
    assert idx1 == idx2


@pytest.mark.skipif(not shutil.which("gzip"), reason="no gzip command")
def test_gzip_command():
    gz = subprocess.run(["gzip", "-c", "-n", "-6"], input=DATA, capture_output=True, check=True).stdout
    out, idx = build(gz, 512 << 10, random_chunks(9, len(gz), 5000))
    assert out == DATA
    check_reads(idx, gz, DATA, seed=9, count=60)


def test_multi_member_padding_and_cross_member_reads():
    gz = multi_member(DATA) + bytes(4096)
    out, idx = build(gz, 256 << 10, random_chunks(4, len(gz), 70_000))
    assert out == DATA and idx.compressed_size == len(gz)
    starts = [c for c in idx.checkpoints if not c.window]
    assert len(starts) == 8                      # one per member (incl. the empty one)
    ends = [c.out_offset for c in starts[1:]]
    check_reads(idx, gz, DATA, seed=5, extra=[(e - 10, 20) for e in ends] + [(e - 300_000, 700_000) for e in ends])


def test_builder_output_is_lazy_and_resumable():
    gz = gzip.compress(DATA, 6)
    b = GzIndexBuilder(1 << 20)
    it = b.feed(gz[:100_000])
    first = next(it)                             # abandon the rest of this iterator
    rest = b"".join(b.feed(gz[100_000:]))
    assert first + rest == DATA
    b.finish()


# ---- range reads: sans-I/O -------------------------------------------------------------------------

def test_range_inflater_small_feeds_and_requests():
    gz = gzip.compress(DATA, 6)
    _, idx = build(gz, 256 << 10)
    rnd = random.Random(7)
    for _ in range(30):
        off, n = rnd.randrange(len(DATA)), rnd.randrange(1, 200_000)
        r = RangeInflater(idx, off, n)
        first = r.want()
        cp = idx.checkpoint_for(off)
        assert first[0] == cp.start
        got = b""
        while (w := r.want()) is not None:
            got += r.feed(gz[w[0]:w[0] + rnd.randint(1, w[1])])   # hand over less than asked
        assert got == DATA[off:off + n]


def test_first_request_covers_the_read():
    gz = gzip.compress(DATA, 6)
    _, idx = build(gz, 512 << 10)
    rnd = random.Random(8)
    for _ in range(50):
        off, n = rnd.randrange(len(DATA)), rnd.randrange(1, 100_000)
        r = RangeInflater(idx, off, n)
        start, size = r.want()
        out = r.feed(gz[start:start + size])
        assert out == DATA[off:off + n] and r.done and r.want() is None


# ---- zinfo ----------------------------------------------------------------------------------------

def test_zinfo_round_trip_and_sidecar():
    gz = multi_member(DATA, 3)
    _, idx = build(gz, 512 << 10)
    z = to_zinfo(idx)
    assert len(z) == ZINFO_HEADER.size + len(idx.checkpoints) * ZINFO_CKPT_SIZE
    have, span = ZINFO_HEADER.unpack_from(z)
    assert (have, span) == (len(idx.checkpoints), 512 << 10)
    side = to_sidecar(idx, z)
    assert len(side) == 32
    again = from_zinfo(z, sidecar=side)
    assert again.uncompressed_size == len(DATA) and again.compressed_size == len(gz)
    assert [(c.out_offset, c.in_offset, c.bits) for c in again.checkpoints] == \
           [(c.out_offset, c.in_offset, c.bits) for c in idx.checkpoints]
    check_reads(again, gz, DATA, seed=11, count=40)
    bare = from_zinfo(z)                         # no sizes: reads stop at the end of the stream
    assert bare.uncompressed_size is None
    check_reads(bare, gz + bytes(100), DATA, seed=12, count=20)
    with pytest.raises(CorruptedError, match="CRC-32"):
        from_zinfo(z[:-1] + b"\1", sidecar=side)


def test_zinfo_version_1_is_one_entry_short():
    gz = gzip.compress(DATA, 6)                  # 10-byte header, as v1 assumed
    _, idx = build(gz, 1 << 20)
    z = to_zinfo(idx)
    v1 = z[:ZINFO_HEADER.size] + z[ZINFO_HEADER.size + ZINFO_CKPT_SIZE:]
    loaded = from_zinfo(v1, compressed_size=len(gz), uncompressed_size=len(DATA))
    assert loaded.checkpoints[0].in_offset == 10
    check_reads(loaded, gz, DATA, seed=13, count=20)


def _patch_ckpt(z: bytes, i: int, **kw) -> bytes:
    off = ZINFO_HEADER.size + i * ZINFO_CKPT_SIZE
    cin, cout, bits = struct.unpack_from("<QQB", z, off)
    vals = dict(cin=cin, cout=cout, bits=bits) | kw
    return z[:off] + struct.pack("<QQB", vals["cin"], vals["cout"], vals["bits"]) + z[off + 17:]


def test_bad_zinfo_is_refused():
    gz = gzip.compress(DATA, 6)
    _, idx = build(gz, 512 << 10)
    z = to_zinfo(idx)
    c2 = idx.checkpoints[2]
    bad = {
        "truncated header": z[:7],
        "truncated": z[:-1000],
        "have too large": struct.pack("<I", 10_000) + z[4:],
        "no checkpoints": struct.pack("<IQ", 0, 1 << 20),
        "bits=9": _patch_ckpt(z, 2, bits=9),
        "out decreasing": _patch_ckpt(z, 2, cout=idx.checkpoints[1].out_offset - 1),
        "in decreasing": _patch_ckpt(z, 2, cin=idx.checkpoints[1].in_offset - 5),
        "first not at 0": _patch_ckpt(z, 0, cout=5),
        "span 0": z[:4] + struct.pack("<Q", 0) + z[12:],
    }
    for what, blob in bad.items():
        with pytest.raises(CorruptedError, match="zinfo"):
            from_zinfo(blob)
    with pytest.raises(CorruptedError, match="past the end"):
        from_zinfo(z, compressed_size=c2.in_offset)
    with pytest.raises(CorruptedError, match="past the uncompressed size"):
        from_zinfo(z, uncompressed_size=idx.checkpoints[-1].out_offset - 1)


# ---- erofs-utils interop ----------------------------------------------------------------------------

@pytest.mark.skipif(not MKFS or not os.access(MKFS, os.X_OK),
                    reason="EROFS_MKFS_NEW does not name a mkfs.erofs >= 1.8 (--tar=i --gzinfo; Debian 12 has 1.5)")
def test_mkfs_erofs_gzinfo_loads_and_serves(tmp_path):
    buf = io.BytesIO()
    rnd = random.Random(21)
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for i in range(12):
            body = make_data(100 + i, rnd.randint(1, 1_500_000))
            ti = tarfile.TarInfo(f"dir{i % 3}/file{i}.bin")
            ti.size, ti.mtime = len(body), 1_700_000_000
            tf.addfile(ti, io.BytesIO(body))
    tar = buf.getvalue()
    gz = gzip.compress(tar, 6, mtime=0)
    (tmp_path / "layer.tar.gz").write_bytes(gz)
    subprocess.run([MKFS, "--quiet", "--tar=i", f"--gzinfo={tmp_path / 'layer.zinfo'}", str(tmp_path / "out.img"),
                    str(tmp_path / "layer.tar.gz")], check=True, capture_output=True, timeout=60)
    theirs = (tmp_path / "layer.zinfo").read_bytes()
    idx = from_zinfo(theirs, compressed_size=len(gz), uncompressed_size=len(tar))
    assert len(idx.checkpoints) >= 2
    check_reads(idx, gz, tar, seed=22, count=100)
    # our builder finds the same checkpoints and windows (gzran.c: 4 MiB span, one point per member)
    _, ours = build(gz, 4 << 20)
    assert [(c.out_offset, c.in_offset, c.bits) for c in ours.checkpoints] == \
           [(c.out_offset, c.in_offset, c.bits) for c in idx.checkpoints]
    assert [c.window for c in ours.checkpoints[1:]] == [c.window for c in idx.checkpoints[1:]]
    assert to_zinfo(ours)[ZINFO_HEADER.size + ZINFO_CKPT_SIZE:] == theirs[ZINFO_HEADER.size + ZINFO_CKPT_SIZE:]


# ---- damage ---------------------------------------------------------------------------------------

def test_flipped_byte_names_the_offset():
    text = make_data(30, 2_000_000).replace(b"\0", b" ")
    gz = gzip.compress(bytes(b for b in text if b < 128), 6)
    rnd = random.Random(31)
    for _ in range(8):
        pos = rnd.randrange(len(gz) // 4, len(gz) * 3 // 4)
        bad = gz[:pos] + bytes([gz[pos] ^ (1 << rnd.randrange(8))]) + gz[pos + 1:]
        with pytest.raises(CorruptedError, match=r"compressed offset \d+") as ei:
            build(bad, 1 << 20, random_chunks(pos, len(bad), 50_000))
        at = int(ei.value.message.rsplit(" ", 1)[1])
        assert at >= pos - 1 and ("check" in ei.value.message or at <= pos + 70_000)


@pytest.mark.parametrize("tail,match", [
    (lambda g: g[:-3], "truncated gzip at compressed offset"),
    (lambda g: g[:len(g) // 2], "truncated gzip at compressed offset"),
    (lambda g: g + b"junk", "trailing garbage"),
    (lambda g: g + bytes(10) + b"\1", "garbage after the zero padding"),
    (lambda g: g[:-8] + bytes([g[-8] ^ 1]) + g[-7:], "incorrect data check"),
    (lambda g: g[:-1] + bytes([g[-1] ^ 1]), "incorrect length check"),
    (lambda g: b"", "no data"),
    (lambda g: b"PK\3\4 not gzip", "incorrect header check"),
])
def test_damaged_streams(tail, match):
    gz = gzip.compress(DATA[:300_000], 6)
    with pytest.raises(CorruptedError, match=match):
        build(tail(gz), 1 << 20, random_chunks(1, len(tail(gz)) or 1, 30_000))


def test_truncated_blob_during_a_read():
    gz = gzip.compress(DATA, 6)
    _, idx = build(gz, 1 << 20)
    short = gz[:len(gz) // 2]
    with pytest.raises(CorruptedError, match="truncated gzip"):
        read_range(idx, len(DATA) // 2 - 1000, 500_000, lambda o, n: short[o:o + n])


def test_gzip_bomb_stays_bounded():
    size = 200 << 20
    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    zero = bytes(1 << 20)
    bomb = b"".join([z.compress(zero) for _ in range(size >> 20)] + [z.flush()])
    assert len(bomb) < 250_000
    tracemalloc.start()
    try:
        t = time.perf_counter()
        b = GzIndexBuilder()                     # 4 MiB span: 50 windows of 32 KiB
        total = biggest = 0
        for chunk in b.feed(bomb):
            total += len(chunk)
            biggest = max(biggest, len(chunk))
        idx = b.finish()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert total == size and biggest <= 256 << 10
    assert peak < idx.memory + (4 << 20), peak
    assert time.perf_counter() - t < 10


# ---- the binding ------------------------------------------------------------------------------------

def test_z_stream_layout_and_close():
    if ctypes.sizeof(ctypes.c_void_p) == 8 and ctypes.sizeof(ctypes.c_ulong) == 8:
        assert ctypes.sizeof(z_stream) == 112
        assert z_stream.data_type.offset == 88
    inf = Inflater(WBITS_GZIP)
    buf = (ctypes.c_char * 100)()
    inf.set_input(gzip.compress(b"x" * 50))
    ret, n = inf.inflate(buf, 0, 100)
    assert (ret, buf.raw[:n]) == (1, b"x" * 50)
    inf.close()
    inf.close()
    with pytest.raises(ValueError):
        inf.inflate(buf, 0, 100)


def test_zstd_frames():
    zstandard = pytest.importorskip("zstandard")
    from erofs_mount.gzindex.zstd import ZstdStreamIndexer
    c = zstandard.ZstdCompressor()
    a, b = DATA[:1_000_000], DATA[1_000_000:1_500_000]
    blob = c.compress(a) + c.compress(b) + struct.pack("<II", 0x184D2A50, 3) + b"xyz" + c.compress(a)
    for chunks in ([len(blob)], random_chunks(2, len(blob), 9000)):
        ix = ZstdStreamIndexer()
        out, pos = [], 0
        for n in chunks:
            out.extend(ix.feed(blob[pos:pos + n]))
            pos += n
        frames = ix.finish()
        assert b"".join(out) == a + b + a
        assert [f.out_offset for f in frames] == [0, len(a), len(a) + len(b), len(a) + len(b)]
        assert blob[frames[1].in_offset:].startswith(c.compress(b)[:4])
    ix = ZstdStreamIndexer()
    list(ix.feed(blob[:-7]))
    with pytest.raises(CorruptedError, match="truncated zstd"):
        ix.finish()


def test_gzindex_is_pure():
    code = "import sys, erofs_mount.gzindex, erofs_mount.gzindex.zstd; print(' '.join(sys.modules))"
    mods = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert not [m for m in mods if m.split(".")[0] in ("trio", "httpx", "pyfuse3", "pyroute2")]
