"""zseek.py (pure): seek table parsing and validation, range → frames, frame decoding, XXH64.

Blobs are built here with ``zstandard`` by an independent little writer; the XXH64 oracle is the
content checksum zstd itself writes at the end of a frame (``write_checksum=True``)."""

from __future__ import annotations

import random
import struct

import pytest
import zstandard

from erofs_mount.errors import CorruptedError, UnsupportedError
from erofs_mount.sources.oci import zseek


def frame_checksum(data: bytes) -> int:
    """Low 32 bits of XXH64 of *data*, as computed by libzstd (the frame's content checksum)."""
    return int.from_bytes(zstandard.ZstdCompressor(write_checksum=True).compress(data)[-4:], "little")


def seekable(data: bytes, frame: int, *, checksums: bool = False, sizes=None) -> tuple[bytes, list]:
    """A seekable-format blob of *data* (frames of *frame* bytes, or the given *sizes*)."""
    sizes = sizes or [min(frame, len(data) - o) for o in range(0, len(data), frame)]
    cctx = zstandard.ZstdCompressor(level=3)
    frames, entries, off = [], [], 0
    for n in sizes:
        piece = data[off:off + n]
        off += n
        f = cctx.compress(piece)
        frames.append(f)
        entries.append((len(f), n, frame_checksum(piece)))
    fmt = "<III" if checksums else "<II"
    table = b"".join(struct.pack(fmt, *(e if checksums else e[:2])) for e in entries)
    table += struct.pack("<IBI", len(entries), 0x80 if checksums else 0, 0x8F92EAB1)
    return b"".join(frames) + struct.pack("<II", 0x184D2A5E, len(table)) + table, entries


def parse(blob: bytes) -> zseek.SeekTable:
    n = zseek.table_size(blob[-9:], len(blob))
    return zseek.parse_seek_table(blob[-n:], len(blob))


DATA = random.Random(1).randbytes(100_000) + bytes(50_000)


@pytest.mark.parametrize("checksums", [False, True])
def test_parse_and_decode_every_frame(checksums):
    blob, entries = seekable(DATA, 16384, checksums=checksums)
    t = parse(blob)
    assert t.nframes == len(entries) == 10 and t.size == len(DATA)
    assert (t.checksums is not None) == checksums
    out = b""
    for i in range(t.nframes):
        coff, csize, doff, dsize = t.frame(i)
        assert doff == len(out)
        out += zseek.decode_frame(blob[coff:coff + csize], dsize, t.checksums[i] if checksums else None)
    assert out == DATA and t.frames_end == sum(e[0] for e in entries)


def test_frames_for():
    t = parse(seekable(DATA, 16384)[0])
    assert t.frames_for(0, 1) == [0]
    assert t.frames_for(16383, 2) == [0, 1]
    assert t.frames_for(16384, 16384) == [1]
    assert t.frames_for(0, 1 << 30) == list(range(10))
    assert t.frames_for(len(DATA) - 1, 100) == [9]
    assert t.frames_for(len(DATA), 1) == [] and t.frames_for(5, 0) == []


def test_empty_frames_are_skipped():
    blob, _ = seekable(DATA[:300], 0, sizes=[100, 0, 100, 0, 100])
    t = parse(blob)
    assert t.nframes == 5 and t.size == 300
    assert t.frames_for(99, 2) == [0, 2]
    assert t.frames_for(100, 1) == [2] and t.frames_for(0, 300) == [0, 2, 4]


def test_zero_frames():
    blob, _ = seekable(b"", 10)
    t = parse(blob)
    assert t.nframes == 0 and t.size == 0 and t.frames_for(0, 10) == []


def test_no_seek_table_is_a_refusal():
    plain = zstandard.ZstdCompressor().compress(DATA)
    with pytest.raises(zseek.NoSeekTable, match="0x8F92EAB1"):
        zseek.table_size(plain[-9:], len(plain))
    with pytest.raises(zseek.NoSeekTable, match="too short"):
        zseek.table_size(b"\0" * 9, 9)
    assert issubclass(zseek.NoSeekTable, UnsupportedError)


def corrupt(blob: bytes, pos: int, value: bytes) -> bytes:
    b = bytearray(blob)
    b[pos:pos + len(value)] = value
    return bytes(b)


def test_corrupted_tables():
    blob, entries = seekable(DATA, 16384)
    n = len(entries)
    tstart = len(blob) - (8 + 8 * n + 9)
    cases = [
        (corrupt(blob, len(blob) - 5, b"\x04"), CorruptedError, "reserved"),           # descriptor bit 2
        (corrupt(blob, len(blob) - 5, b"\x40"), CorruptedError, "reserved"),           # bit 6
        (corrupt(blob, tstart, b"\x50\x2a\x4d\x18"), CorruptedError, "skippable frame magic"),
        (corrupt(blob, tstart + 4, struct.pack("<I", 7)), CorruptedError, "skippable frame size"),
        (corrupt(blob, tstart + 8, struct.pack("<I", entries[0][0] + 1)), CorruptedError, "add up"),
        (corrupt(blob, tstart + 8, struct.pack("<I", 0)), CorruptedError, "compressed size 0"),
        (corrupt(blob, tstart + 12, struct.pack("<I", (64 << 20) + 1)), UnsupportedError, "at most"),
        (corrupt(blob, len(blob) - 9, struct.pack("<I", n + 1)), CorruptedError, "corrupted seek table"),  # count off
        (corrupt(blob, len(blob) - 9, struct.pack("<I", 0x7FFFFFF)), UnsupportedError, "larger than"),
        (corrupt(blob, len(blob) - 9, struct.pack("<I", 0xFFFFFFFF)), CorruptedError, "frames"),
        (corrupt(blob, len(blob) - 9, struct.pack("<I", 100_000)), CorruptedError, "need"),  # > blob size
    ]
    for bad, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            parse(bad)
    with pytest.raises(CorruptedError, match="expected"):
        zseek.parse_seek_table(blob[-20:], len(blob))


def test_decode_frame_errors():
    piece = DATA[:5000]
    f = zstandard.ZstdCompressor().compress(piece)
    assert zseek.decode_frame(f, 5000, frame_checksum(piece)) == piece
    with pytest.raises(CorruptedError, match="checksum"):
        zseek.decode_frame(f, 5000, frame_checksum(piece) ^ 1)
    with pytest.raises(CorruptedError, match="or more"):
        zseek.decode_frame(f, 4999, None)
    with pytest.raises(CorruptedError, match="4999|5000"):
        zseek.decode_frame(f, 5001, None)
    with pytest.raises(CorruptedError, match="not a zstd frame"):
        zseek.decode_frame(b"\0" * 20, 10, None)
    with pytest.raises(CorruptedError):
        zseek.decode_frame(f[:4] + bytes(len(f) - 4), 5000, None)
    with pytest.raises(CorruptedError):
        zseek.decode_frame(f[:len(f) // 2], 5000, None)   # truncated


def test_huge_window_refused():
    # a frame asking for a 128 MiB window while the table says 1 KiB: refused, not allocated
    big = zstandard.ZstdCompressor(compression_params=zstandard.ZstdCompressionParameters(
        window_log=27, write_content_size=False)).compress(random.Random(3).randbytes(1 << 20) * 2)
    with pytest.raises(CorruptedError):
        zseek.decode_frame(big, 1024, None)


@pytest.mark.parametrize("n", [0, 1, 3, 4, 5, 7, 8, 9, 15, 16, 31, 32, 33, 63, 64, 65, 100, 1000, 4099])
def test_xxh64_matches_libzstd(n):
    data = random.Random(n).randbytes(n)
    assert zseek.xxh64(data) & 0xFFFFFFFF == frame_checksum(data)


def test_xxh64_known_values():
    assert zseek.xxh64(b"") == 0xEF46DB3751D8E999
    assert zseek.xxh64(b"a") == 0xD24EC4F1A98C6E5B


def test_decode_frame_from_many_threads():
    # frames are decoded in worker threads: a decompressor shared between threads corrupts output
    from concurrent.futures import ThreadPoolExecutor
    pieces = [random.Random(k).randbytes(300_000) for k in range(4)]
    frames = [zstandard.ZstdCompressor(level=3).compress(p) for p in pieces]
    with ThreadPoolExecutor(4) as pool:
        for k, out in enumerate(pool.map(lambda k: zseek.decode_frame(frames[k % 4], 300_000, None), range(64))):
            assert out == pieces[k % 4]
