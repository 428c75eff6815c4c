"""PURE: a random-access index of a gzip stream (tar+gzip OCI layers), built while streaming it once.

The technique is zlib's ``examples/zran.c``, also used by AWS SOCI (``gzip_zinfo.c``) and erofs-utils
(``lib/gzran.c``): inflate with ``Z_BLOCK`` so zlib stops at every deflate block boundary; at a
boundary (``data_type & 128`` and not inside the last block, ``data_type & 64``) about every *span*
bytes of output, record a checkpoint = (uncompressed offset, compressed byte offset of the first full
byte, the 0-7 bits of the preceding byte that belong to the next block, the last 32 KiB of output).
To read at offset X: raw-inflate from the checkpoint at or before X (``inflatePrime`` the bits,
``inflateSetDictionary`` the window), discard output up to X.

Multi-member gzip (pigz, ``cat a.gz b.gz``, stargz): after a member ends zlib (windowBits 31) has
checked its CRC-32 and ISIZE; the next member gets a checkpoint right after its header (no window:
a member never refers back).  Zero bytes after the last member are padding; anything else is an error.
A read that runs past a member's end skips its 8-byte trailer and parses the next header (zlib in
gzip mode, which then checks that member's trailer too).

Memory: the builder holds zlib's state (~40 KiB), one 256 KiB output buffer and the checkpoints:
32 KiB of window each, one per *span* of output plus one per member (no window) -- a 1 GiB layer at
the default 4 MiB span costs 8 MiB.  Windows are kept raw, as zran.c and SOCI store them.  A point
is taken at the first block end more than *span* bytes after the previous one (``>``, as gzran.c and
SOCI do), so for the same stream and span our zinfo is byte for byte the one erofs-utils writes,
but for the windows of member-start points (ours zeros, theirs stale buffer bytes; never used).

Threads: a ``GzIndex`` is immutable and shareable; a builder or ``RangeInflater`` belongs to one
thread.  ctypes drops the GIL around ``inflate()``, so reads in worker threads run in parallel.
"""

from __future__ import annotations

import bisect
import ctypes
import struct
import zlib
from dataclasses import dataclass, field
from typing import Callable, Iterator

from ..errors import CorruptedError
from .zlibc import (DT_BLOCK_END, DT_LAST_BLOCK, DT_UNUSED_BITS, WBITS_GZIP, WBITS_RAW, WINSIZE, Z_BLOCK,
                    Z_BUF_ERROR, Z_STREAM_END, Inflater)

DEFAULT_SPAN = 4 << 20
GZIP_MAGIC0 = 0x1F
_OUT_CHUNK = 256 << 10       # builder output buffer: the largest chunk feed() yields
_SCRATCH = 128 << 10         # range reads: output buffer for skipping / collecting
_TRAILER = 8                 # CRC-32 + ISIZE after each member


@dataclass(frozen=True, slots=True)
class Checkpoint:
    out_offset: int          # uncompressed offset
    in_offset: int           # compressed offset of the first full byte after the block boundary
    bits: int                # 0-7: the top *bits* bits of byte in_offset-1 start the next block
    window: bytes = field(default=b"", repr=False)   # <= 32 KiB of output before out_offset (b"" at a member start)

    @property
    def start(self) -> int:
        """First compressed byte a read from here needs."""
        return self.in_offset - (1 if self.bits else 0)


@dataclass(frozen=True, slots=True)
class GzIndex:
    uncompressed_size: int | None            # None only for a bare zinfo loaded without sizes
    compressed_size: int | None
    checkpoints: tuple[Checkpoint, ...]
    span: int = DEFAULT_SPAN
    _outs: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_outs", tuple(c.out_offset for c in self.checkpoints))

    def position(self, out_offset: int) -> int:
        """Index of the checkpoint a read at *out_offset* starts from (the last one at or before it)."""
        if out_offset < 0:
            raise ValueError(f"negative uncompressed offset {out_offset}")
        return max(bisect.bisect_right(self._outs, out_offset) - 1, 0)

    def checkpoint_for(self, out_offset: int) -> Checkpoint:
        return self.checkpoints[self.position(out_offset)]

    def compressed_end(self, out_end: int, after: int = 0) -> int | None:
        """A compressed offset sufficient to produce output up to *out_end* (from checkpoint *after*):
        the next checkpoint's byte plus one when it has bits (erofs-utils gzran.c), else the size."""
        j = max(bisect.bisect_left(self._outs, out_end), after + 1)
        if j < len(self.checkpoints):
            c = self.checkpoints[j]
            return c.in_offset + (1 if c.bits else 0)
        return self.compressed_size

    @property
    def memory(self) -> int:
        """Bytes held by the windows."""
        return sum(len(c.window) for c in self.checkpoints)


_MEMBER, _BETWEEN, _PADDING, _DONE = range(4)


class GzIndexBuilder:
    """Streaming index builder: ``for chunk in b.feed(compressed): parse(chunk)`` … ``b.finish()``.

    ``feed`` returns a lazy iterator of decompressed chunks (bytes, <= 256 KiB each): output is made
    only as it is consumed, so a gzip bomb never materialises (1 MB of zeros-gzip = 1 GB of output
    arrives 256 KiB at a time).  Input not yet inflated when an iterator is dropped is inflated by the
    next ``feed()`` (whose iterator yields that output first) or by ``finish()`` (which discards it).
    """

    def __init__(self, span: int = DEFAULT_SPAN) -> None:
        if span < 1:
            raise ValueError(f"span must be positive, not {span}")
        self.span = span
        self._z = Inflater(WBITS_GZIP)
        self._buf = (ctypes.c_char * _OUT_CHUNK)()
        self._pos = 0                    # bytes of output waiting in _buf
        self._out = 0                    # total uncompressed bytes produced
        self._fed = 0                    # total compressed bytes given
        self._cps: list[Checkpoint] = []
        self._state = _MEMBER
        self._initial = True             # next block boundary is a member start
        self._members = 0
        self._gen = 0
        self._error: Exception | None = None

    @property
    def members(self) -> int:
        """Complete gzip members seen so far."""
        return self._members

    def feed(self, compressed: bytes) -> Iterator[bytes]:
        self._check_usable()
        if compressed:
            self._z.set_input(compressed)
            self._fed += len(compressed)
        self._gen += 1
        return self._drain(self._gen)

    def finish(self) -> GzIndex:
        """The index; ``CorruptedError`` if the stream stopped inside a member (or had none)."""
        self._check_usable()
        self._gen += 1
        for _ in self._drain(self._gen):
            pass
        if self._state == _MEMBER:
            self._fail(CorruptedError("not a gzip stream: no data" if not self._fed else
                                      f"truncated gzip at compressed offset {self._fed}"))
        self._state = _DONE
        self._z.close()
        return GzIndex(self._out, self._fed, tuple(self._cps), self.span)

    def _check_usable(self) -> None:
        if self._error is not None:
            raise self._error
        if self._state == _DONE:
            raise ValueError("GzIndexBuilder already finished")

    def _fail(self, exc: Exception) -> None:
        self._error = exc
        self._z.close()
        raise exc

    def _drain(self, gen: int) -> Iterator[bytes]:
        z, buf, cap = self._z, self._buf, _OUT_CHUNK
        try:
            while self._gen == gen:
                if self._state == _PADDING:
                    if not self._padding(z):
                        break
                    continue
                if self._state == _BETWEEN:
                    nxt = z.peek()
                    if nxt is None:
                        break
                    if nxt == 0:
                        self._state = _PADDING
                        continue
                    if nxt != GZIP_MAGIC0:
                        raise CorruptedError(f"gzip: trailing garbage after the member ending at compressed "
                                             f"offset {z.in_offset}")
                    z.reset(WBITS_GZIP)
                    self._state, self._initial = _MEMBER, True
                ret, n = z.inflate(buf, self._pos, cap, Z_BLOCK)
                self._pos += n
                self._out += n
                if ret == Z_STREAM_END:
                    self._state = _BETWEEN
                    self._members += 1
                else:
                    dt = z.data_type
                    if dt & DT_BLOCK_END and not dt & DT_LAST_BLOCK and (
                            self._initial or self._out - self._cps[-1].out_offset > self.span):
                        window = b"" if self._initial else z.get_dictionary()
                        self._cps.append(Checkpoint(self._out, z.in_offset, dt & DT_UNUSED_BITS, window))
                        self._initial = False
                if self._pos == cap:
                    self._pos = 0
                    yield bytes(buf)
                elif ret == Z_BUF_ERROR:
                    break                   # needs input
            if self._pos and self._gen == gen:
                chunk, self._pos = buf[:self._pos], 0
                yield chunk
        except CorruptedError as exc:
            self._fail(exc)

    def _padding(self, z: Inflater) -> bool:
        at = z.in_offset
        rest = z.take(z.avail_in)
        if not rest:
            return False
        tail = rest.lstrip(b"\0")
        if tail:
            raise CorruptedError(f"gzip: garbage after the zero padding at compressed offset "
                                 f"{at + len(rest) - len(tail)}")
        return True


_RAW, _TRAIL, _GZIP, _NEXT, _END = range(5)


class RangeInflater:
    """Sans-I/O read of uncompressed ``[out_offset, out_offset + length)`` (clamped to the size)::

        r = RangeInflater(index, off, n)
        while (want := r.want()) is not None:      # (compressed offset, size) to fetch next
            out += r.feed(await source.read_at(*want))   # b"" = end of the blob

    The first ``want()`` covers, up to *request* bytes, everything the read can need (from the
    checkpoint to the next one past the end), so a ranged GET usually fetches it in one go.  ``feed``
    takes bytes starting exactly at the offset ``want()`` named (fewer than asked is fine) and
    returns the requested bytes it could produce, in order.
    """

    def __init__(self, index: GzIndex, out_offset: int, length: int, *, request: int = 4 << 20) -> None:
        if length < 0:
            raise ValueError(f"negative length {length}")
        if index.uncompressed_size is not None:
            length = max(0, min(length, index.uncompressed_size - out_offset))
        i = index.position(out_offset)
        cp = index.checkpoints[i]
        self.index = index
        self._left = length
        self._skip = out_offset - cp.out_offset
        self._next = cp.start                  # compressed offset the next feed() starts at
        self._bits = cp.bits
        self._bound = index.compressed_end(out_offset + length, i) or 0
        self._request = request
        self._state = _RAW
        self._trailer = 0
        self._eof = False
        self._z: Inflater | None = None
        self._buf = None
        if length:
            self._z = Inflater(WBITS_RAW, in_offset=cp.in_offset)
            self._z.set_dictionary(cp.window)
            self._buf = (ctypes.c_char * _SCRATCH)()

    @property
    def done(self) -> bool:
        return self._left == 0 or self._state == _END or self._eof

    def want(self) -> tuple[int, int] | None:
        """The next compressed range to fetch, or None when the read is complete."""
        if self.done:
            self.close()
            return None
        size = self.index.compressed_size
        if size is not None and self._next >= size:
            self._at_eof()
            return None
        n = self._bound - self._next
        n = self._request if n <= 0 else min(n, self._request)
        if size is not None:
            n = min(n, size - self._next)
        return self._next, n

    def feed(self, compressed: bytes) -> bytes:
        if self.done:
            return b""
        if not compressed:
            self._at_eof()
            return b""
        self._next += len(compressed)
        z = self._z
        if self._bits:                         # zran.c: the partial byte before the checkpoint
            z.prime(self._bits, compressed[0] >> (8 - self._bits))
            self._bits, compressed = 0, compressed[1:]
        z.set_input(compressed)
        try:
            return self._run(z)
        except CorruptedError:
            self.close()
            raise

    def _run(self, z: Inflater) -> bytes:
        out = []
        buf = self._buf
        while self._left:
            if self._state == _TRAIL:
                self._trailer -= z.skip(self._trailer)
                if self._trailer:
                    break
                self._state = _NEXT
            if self._state == _NEXT:
                nxt = z.peek()
                if nxt is None:
                    break
                if nxt == 0:                   # zero padding after the last member
                    self._state = _END
                    self._at_eof()
                    break
                z.reset(WBITS_GZIP)
                self._state = _GZIP
            room = min(self._skip or self._left, _SCRATCH)
            ret, n = z.inflate(buf, 0, room)
            if self._skip:
                self._skip -= n
            elif n:
                out.append(buf[:n])
                self._left -= n
            if ret == Z_STREAM_END:
                if self._state == _RAW:        # raw inflate leaves the member's trailer to us
                    self._state, self._trailer = _TRAIL, _TRAILER
                else:
                    self._state = _NEXT
            elif ret == Z_BUF_ERROR:
                break
        if self.done:
            self.close()
        return b"".join(out)

    def _at_eof(self) -> None:
        self._eof = True
        self.close()
        if self._left == 0 or self._state in (_NEXT, _END):
            if self._left and self.index.uncompressed_size is not None:
                raise CorruptedError(f"gzip: stream ends before uncompressed offset {self.index.uncompressed_size}"
                                     f" (compressed offset {self._next})")
            return
        raise CorruptedError(f"truncated gzip at compressed offset {self._next}")

    def close(self) -> None:
        if self._z is not None:
            self._z.close()
            self._z = None


def read_range(index: GzIndex, out_offset: int, length: int, pread: Callable[[int, int], bytes]) -> bytes:
    """Uncompressed bytes ``[out_offset, out_offset + length)`` (short at the end of the stream),
    reading compressed bytes with ``pread(offset, size)``."""
    r = RangeInflater(index, out_offset, length)
    parts = []
    try:
        while (w := r.want()) is not None:
            parts.append(r.feed(pread(*w)))
    finally:
        r.close()
    return b"".join(parts)

# ---- AWS SOCI zinfo v2, byte for byte as erofs-utils lib/gzran.c (export/open) and SOCI gzip_zinfo.c --
# Header: __le32 have (checkpoints), __le64 span_size -- 12 bytes, packed.  Then *have* checkpoints of
# __le64 in (byte offset of the first full byte), __le64 out, __u8 bits, u8 window[32768] -- packed,
# 32785 bytes.  The window is the ring buffer unrolled: its *last* bytes are the ones before ``out``
# (SOCI zero-fills the rest; gzran.c leaves stale bytes).  Version 1 (SOCI's first) omitted checkpoint
# 0, implied at in=10, out=0: recognised, like both readers do, by the file being one entry short.
# Totals are not in the format: they travel in a 32-byte sidecar (or the caller passes them).
ZINFO_HEADER = struct.Struct("<IQ")
ZINFO_CKPT = struct.Struct("<QQB")
ZINFO_CKPT_SIZE = ZINFO_CKPT.size + WINSIZE
SIDECAR = struct.Struct("<8sQQI4x")          # magic, compressed size, uncompressed size, crc32(zinfo)
SIDECAR_MAGIC = b"EMGZIX01"


def to_zinfo(index: GzIndex) -> bytes:
    parts = [ZINFO_HEADER.pack(len(index.checkpoints), index.span)]
    for c in index.checkpoints:
        parts.append(ZINFO_CKPT.pack(c.in_offset, c.out_offset, c.bits))
        parts.append(bytes(WINSIZE - len(c.window)) + c.window)
    return b"".join(parts)


def to_sidecar(index: GzIndex, zinfo: bytes) -> bytes:
    """The totals the zinfo lacks, bound to that zinfo by its CRC-32."""
    if index.compressed_size is None or index.uncompressed_size is None:
        raise ValueError("index sizes unknown")
    return SIDECAR.pack(SIDECAR_MAGIC, index.compressed_size, index.uncompressed_size, zlib.crc32(zinfo))


def from_zinfo(data: bytes, *, sidecar: bytes | None = None, compressed_size: int | None = None,
               uncompressed_size: int | None = None) -> GzIndex:
    """Load and validate a zinfo (ours, erofs-utils' or SOCI's); ``CorruptedError`` names the defect."""
    data = bytes(data)
    n = len(data)
    if n < ZINFO_HEADER.size:
        raise CorruptedError(f"zinfo: {n} bytes, shorter than its {ZINFO_HEADER.size}-byte header")
    have, span = ZINFO_HEADER.unpack_from(data)
    cps: list[Checkpoint] = []
    if n - ZINFO_HEADER.size == (have - 1) * ZINFO_CKPT_SIZE and have:
        cps.append(Checkpoint(0, 10, 0, b""))            # version 1
    elif n - ZINFO_HEADER.size != have * ZINFO_CKPT_SIZE:
        raise CorruptedError(f"zinfo: {n} bytes cannot hold the {have} checkpoints its header announces "
                             f"({ZINFO_HEADER.size + have * ZINFO_CKPT_SIZE} expected)")
    if not have:
        raise CorruptedError("zinfo: no checkpoints")
    if not 0 < span < 1 << 32:
        raise CorruptedError(f"zinfo: span {span} out of range")
    if sidecar is not None:
        if len(sidecar) != SIDECAR.size:
            raise CorruptedError(f"zinfo sidecar: {len(sidecar)} bytes, expected {SIDECAR.size}")
        magic, compressed_size, uncompressed_size, crc = SIDECAR.unpack(sidecar)
        if magic != SIDECAR_MAGIC:
            raise CorruptedError(f"zinfo sidecar: bad magic {magic!r}")
        if crc != zlib.crc32(data):
            raise CorruptedError("zinfo sidecar: does not belong to this zinfo (CRC-32 mismatch)")
    for off in range(ZINFO_HEADER.size, n, ZINFO_CKPT_SIZE):
        cin, cout, bits = ZINFO_CKPT.unpack_from(data, off)
        window = data[off + ZINFO_CKPT.size + WINSIZE - min(cout, WINSIZE):off + ZINFO_CKPT_SIZE]
        cps.append(Checkpoint(cout, cin, bits, window))
    prev = None
    for i, c in enumerate(cps):
        where = f"zinfo: checkpoint {i} (in {c.in_offset}, out {c.out_offset}, bits {c.bits})"
        if c.bits > 7 or (c.bits and not c.in_offset):
            raise CorruptedError(f"{where}: bits must be 0-7 and follow a byte")
        if i == 0 and c.out_offset:
            raise CorruptedError(f"{where}: the first checkpoint must be at uncompressed offset 0")
        if prev is not None and (c.out_offset < prev.out_offset
                                 or c.in_offset * 8 - c.bits <= prev.in_offset * 8 - prev.bits):
            raise CorruptedError(f"{where}: offsets do not increase")
        prev = c
    if compressed_size is not None and prev.in_offset > compressed_size:
        raise CorruptedError(f"zinfo: checkpoint past the end of the {compressed_size}-byte blob")
    if uncompressed_size is not None and prev.out_offset > uncompressed_size:
        raise CorruptedError(f"zinfo: checkpoint past the uncompressed size {uncompressed_size}")
    return GzIndex(uncompressed_size, compressed_size, tuple(cps), span)


__all__ = ["Checkpoint", "GzIndex", "GzIndexBuilder", "RangeInflater", "read_range", "to_zinfo", "from_zinfo",
           "to_sidecar", "DEFAULT_SPAN", "WINSIZE"]
