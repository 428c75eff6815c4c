"""PURE: the zstd seekable format (zstd ``contrib/seekable_format``): seek table parsing,
range → frame mapping, frame decoding and the XXH64 used by its checksums.  No I/O.

A seekable blob is a run of independent zstd frames followed by one skippable frame
(magic ``0x184D2A5E``, u32 frame size) holding the seek table: one entry per frame
(u32 compressed size, u32 decompressed size, and, when the descriptor's bit 7 is set,
u32 checksum = low 32 bits of XXH64(seed 0) of the decompressed frame), then a 9-byte
footer: u32 number of frames, u8 seek table descriptor (bit 7 checksum flag, bits 2-6
reserved and zero), u32 seekable magic ``0x8F92EAB1``.  All little-endian.  Facts from
zstd ``contrib/seekable_format/zstd_seekable_compression_format.md`` and
``zstdseek_decompress.c`` (``ZSTD_seekable_loadSeekTable``); the code is ours.

Limits (a hostile table must not make us allocate much): at most ``MAX_FRAMES`` frames,
a table of at most ``MAX_TABLE_BYTES``, and frames of at most ``MAX_FRAME_SIZE``
decompressed bytes (the reference library allows 1 GiB; we serve random access, where
a frame is the unit of decode, so we refuse frames larger than 64 MiB).
"""

from __future__ import annotations

import bisect
import struct
from dataclasses import dataclass

from ...errors import CorruptedError, UnsupportedError
from ...zstdframe import decode_exact

SKIPPABLE_MAGIC = 0x184D2A5E        # the seek table's skippable frame (spec: this exact value)
SEEKABLE_MAGIC = 0x8F92EAB1
FOOTER_SIZE = 9                     # ZSTD_seekTableFooterSize
SKIPPABLE_HEADER_SIZE = 8
CHECKSUM_FLAG = 0x80
RESERVED_BITS = 0x7C                # bits 2-6
MAX_FRAMES = 0x8000000              # ZSTD_SEEKABLE_MAXFRAMES
MAX_TABLE_BYTES = 64 << 20
MAX_FRAME_SIZE = 64 << 20
ZSTD_FRAME_MAGIC = 0xFD2FB528

_FOOTER = struct.Struct("<IBI")
_SKIP = struct.Struct("<II")


class NoSeekTable(UnsupportedError):
    """The blob does not end with a seek table (a plain zstd stream): refused, not corrupted."""


@dataclass(frozen=True, slots=True)
class SeekTable:
    c_offsets: tuple[int, ...]      # compressed start of each frame (and the table's start, last)
    d_offsets: tuple[int, ...]      # decompressed start of each frame (and the total size, last)
    checksums: tuple[int, ...] | None

    @property
    def nframes(self) -> int:
        return len(self.c_offsets) - 1

    @property
    def size(self) -> int:
        """Total decompressed size."""
        return self.d_offsets[-1]

    @property
    def frames_end(self) -> int:
        """Compressed offset where the seek table begins."""
        return self.c_offsets[-1]

    def frame(self, i: int) -> tuple[int, int, int, int]:
        """(compressed offset, compressed size, decompressed offset, decompressed size) of frame *i*."""
        c, d = self.c_offsets, self.d_offsets
        return c[i], c[i + 1] - c[i], d[i], d[i + 1] - d[i]

    def frames_for(self, offset: int, length: int) -> list[int]:
        """Indexes of the non-empty frames covering decompressed [offset, offset+length), clamped to the size."""
        end = min(offset + length, self.size)
        if length <= 0 or offset >= end:
            return []
        d = self.d_offsets
        first = bisect.bisect_right(d, offset) - 1
        last = bisect.bisect_left(d, end) - 1   # the frame holding byte end-1
        return [i for i in range(first, last + 1) if d[i + 1] > d[i]]


def table_size(footer: bytes, blob_size: int) -> int:
    """From the blob's last 9 bytes: the size of the whole seek table skippable frame.

    Raises NoSeekTable when there is no seekable footer, CorruptedError/UnsupportedError
    when there is one but it cannot be right."""
    if blob_size < FOOTER_SIZE + SKIPPABLE_HEADER_SIZE or len(footer) != FOOTER_SIZE:
        raise NoSeekTable(f"{blob_size} bytes, too short to end with a seek table")
    nframes, desc, magic = _FOOTER.unpack(footer)
    if magic != SEEKABLE_MAGIC:
        raise NoSeekTable(f"no seekable magic 0x8F92EAB1 at the end (found {magic:#010x})")
    if desc & RESERVED_BITS:
        raise CorruptedError(f"corrupted seek table: reserved descriptor bits set ({desc:#04x})")
    if nframes > MAX_FRAMES:
        raise CorruptedError(f"corrupted seek table: {nframes} frames (at most {MAX_FRAMES})")
    esz = 12 if desc & CHECKSUM_FLAG else 8
    total = SKIPPABLE_HEADER_SIZE + nframes * esz + FOOTER_SIZE
    if total > MAX_TABLE_BYTES:
        raise UnsupportedError(f"seek table of {total} bytes ({nframes} frames) is larger than {MAX_TABLE_BYTES}")
    if total > blob_size:
        raise CorruptedError(f"corrupted seek table: {nframes} frames need {total} bytes, the blob has {blob_size}")
    return total


def parse_seek_table(table: bytes, blob_size: int) -> SeekTable:
    """*table* = the blob's last ``table_size(...)`` bytes (the whole skippable frame)."""
    total = table_size(table[-FOOTER_SIZE:], blob_size)
    if len(table) != total:
        raise CorruptedError(f"seek table: {len(table)} bytes given, {total} expected")
    magic, fsize = _SKIP.unpack_from(table, 0)
    if magic != SKIPPABLE_MAGIC:
        raise CorruptedError(f"corrupted seek table: skippable frame magic {magic:#010x}, expected {SKIPPABLE_MAGIC:#010x}")
    if fsize != total - SKIPPABLE_HEADER_SIZE:
        raise CorruptedError(f"corrupted seek table: skippable frame size {fsize}, expected {total - SKIPPABLE_HEADER_SIZE}")
    _, desc, _ = _FOOTER.unpack_from(table, total - FOOTER_SIZE)
    has_sum = bool(desc & CHECKSUM_FLAG)
    entries = memoryview(table)[SKIPPABLE_HEADER_SIZE:total - FOOTER_SIZE]
    fmt = "<III" if has_sum else "<II"
    c_off, d_off, sums = [0], [0], []
    c = d = 0
    for i, e in enumerate(struct.iter_unpack(fmt, entries)):
        csize, dsize = e[0], e[1]
        if csize == 0:
            raise CorruptedError(f"corrupted seek table: frame {i} has compressed size 0")
        if dsize > MAX_FRAME_SIZE:
            raise UnsupportedError(f"seek table: frame {i} decompresses to {dsize} bytes (at most {MAX_FRAME_SIZE})")
        c += csize
        d += dsize
        c_off.append(c)
        d_off.append(d)
        if has_sum:
            sums.append(e[2])
    frames_end = blob_size - total
    if c != frames_end:
        raise CorruptedError(
            f"corrupted seek table: frames add up to {c} compressed bytes, the blob has {frames_end} before its table")
    return SeekTable(tuple(c_off), tuple(d_off), tuple(sums) if has_sum else None)


# ------------------------------------------------------------------------------- decoding

def decode_frame(raw: bytes, dsize: int, checksum: int | None) -> bytes:
    """Decompress one frame of the table to exactly *dsize* bytes and check its checksum.

    Raises CorruptedError (errno EIO) on any mismatch; never decodes more than dsize + 1 bytes."""
    if len(raw) < 4 or int.from_bytes(raw[:4], "little") != ZSTD_FRAME_MAGIC:
        raise CorruptedError("not a zstd frame")
    out = decode_exact(raw, dsize, strict=True, what="frame (seek table size)")
    if checksum is not None and xxh64(out) & 0xFFFFFFFF != checksum:
        raise CorruptedError("frame fails its seek table checksum (XXH64)")
    return out


# ------------------------------------------------------------------------------- XXH64
# Written from the xxHash specification (xxhash doc/xxhash_spec.md, "XXH64 algorithm").

_M = (1 << 64) - 1
P1, P2, P3, P4, P5 = (0x9E3779B185EBCA87, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9,
                      0x85EBCA77C2B2AE63, 0x27D4EB2F165667C5)


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (64 - r))) & _M


def _round(acc: int, lane: int) -> int:
    acc = (acc + lane * P2) & _M
    return (_rotl(acc, 31) * P1) & _M


def xxh64(data: bytes, seed: int = 0) -> int:
    n = len(data)
    mv = memoryview(data)
    pos = 0
    if n >= 32:
        v1, v2, v3, v4 = (seed + P1 + P2) & _M, (seed + P2) & _M, seed, (seed - P1) & _M
        stop = n - n % 32
        for a, b, c, d in struct.iter_unpack("<4Q", mv[:stop]):
            v1 = (_rotl((v1 + a * P2) & _M, 31) * P1) & _M
            v2 = (_rotl((v2 + b * P2) & _M, 31) * P1) & _M
            v3 = (_rotl((v3 + c * P2) & _M, 31) * P1) & _M
            v4 = (_rotl((v4 + d * P2) & _M, 31) * P1) & _M
        pos = stop
        h = (_rotl(v1, 1) + _rotl(v2, 7) + _rotl(v3, 12) + _rotl(v4, 18)) & _M
        for v in (v1, v2, v3, v4):
            h = ((h ^ _round(0, v)) * P1 + P4) & _M
    else:
        h = (seed + P5) & _M
    h = (h + n) & _M
    while pos + 8 <= n:
        (k,) = struct.unpack_from("<Q", mv, pos)
        h = (_rotl(h ^ _round(0, k), 27) * P1 + P4) & _M
        pos += 8
    if pos + 4 <= n:
        (k,) = struct.unpack_from("<I", mv, pos)
        h = (_rotl(h ^ ((k * P1) & _M), 23) * P2 + P3) & _M
        pos += 4
    while pos < n:
        h = (_rotl(h ^ ((mv[pos] * P5) & _M), 11) * P1) & _M
        pos += 1
    h ^= h >> 33
    h = (h * P2) & _M
    h ^= h >> 29
    h = (h * P3) & _M
    h ^= h >> 32
    return h
