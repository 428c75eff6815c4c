"""Chunk arithmetic, a byte-bounded LRU of chunks and a read-ahead detector (PURE).

Used by every remote source: reads are split into aligned chunks of
``chunk_size`` bytes (the last one short, clamped to the source size); chunks
live in ``ChunkCache``; ``ReadAhead`` watches the offsets asked for and says
how many chunks past a read to fetch in the background.
"""

from __future__ import annotations

from collections import OrderedDict


def clamp(offset: int, length: int, size: int) -> tuple[int, int]:
    """(offset, length) clamped to [0, size); length 0 past the end."""
    if offset < 0 or length < 0:
        raise ValueError(f"negative offset or length ({offset}, {length})")
    if offset >= size:
        return offset, 0
    return offset, min(length, size - offset)


def chunk_range(offset: int, length: int, chunk_size: int) -> range:
    """Indexes of the chunks covering [offset, offset+length) (length > 0)."""
    return range(offset // chunk_size, (offset + length - 1) // chunk_size + 1)


def chunk_extent(index: int, chunk_size: int, size: int) -> tuple[int, int]:
    """(start, end) byte offsets of chunk *index*, end clamped to *size*."""
    start = index * chunk_size
    return start, min(start + chunk_size, size)


def runs(indexes: list[int], max_run: int) -> list[tuple[int, int]]:
    """Sorted unique chunk indexes → [(first, count)] of consecutive runs of at most *max_run*."""
    out: list[tuple[int, int]] = []
    for i in sorted(set(indexes)):
        if out and out[-1][0] + out[-1][1] == i and out[-1][1] < max_run:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((i, 1))
    return out


def assemble(chunks: dict[int, bytes], offset: int, length: int, chunk_size: int) -> bytes:
    """Cut [offset, offset+length) out of the chunks that cover it (one copy: slices of
    memoryviews, joined)."""
    if length == 0:
        return b""
    idx = chunk_range(offset, length, chunk_size)
    if len(idx) == 1:
        chunk = chunks[idx[0]]
        start = offset - idx[0] * chunk_size
        if start == 0 and length == len(chunk) and type(chunk) is bytes:
            return chunk  # immutable: no copy at all
        return bytes(memoryview(chunk)[start:start + length])
    parts = []
    for i in idx:
        base = i * chunk_size
        lo = max(offset, base) - base
        hi = min(offset + length, base + chunk_size) - base
        parts.append(memoryview(chunks[i])[lo:hi])
    return b"".join(parts)


class ChunkCache:
    """LRU of chunk index → bytes, bounded by total bytes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self._data: OrderedDict[int, bytes] = OrderedDict()

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, index: int) -> bool:
        return index in self._data

    def get(self, index: int) -> bytes | None:
        data = self._data.get(index)
        if data is None:
            self.misses += 1
            return None
        self._data.move_to_end(index)
        self.hits += 1
        return data

    def indexes(self):
        """The cached chunk indexes (a view, LRU order)."""
        return self._data.keys()

    def discard(self, index: int) -> bool:
        """Drop one chunk (not counted as an eviction); was it there?"""
        old = self._data.pop(index, None)
        if old is None:
            return False
        self.used -= len(old)
        return True

    def peek(self, index: int) -> bytes | None:
        """Like get() without touching LRU order or counters."""
        return self._data.get(index)

    def put(self, index: int, data: bytes) -> None:
        if len(data) > self.limit:
            return
        old = self._data.pop(index, None)
        if old is not None:
            self.used -= len(old)
        self._data[index] = data
        self.used += len(data)
        while self.used > self.limit:
            _, victim = self._data.popitem(last=False)
            self.used -= len(victim)
            self.evictions += 1


RAMP_FIRST = 4  # chunks read ahead when a stream is first seen
RAMP_GROWTH = 4  # window growth per continuing read: few round trips to reach full speed


class ReadAhead:
    """Sequential-stream detector: the window grows (x4) while reads keep going forward.

    Several interleaved streams are tracked (up to *streams*), each by the
    (start, end) of its last read.  A read continues a stream when it starts
    after that read's start, at most *slack* (one chunk) past its end, and ends
    beyond it: the
    kernel and FUSE issue slightly overlapping or reordered sequential reads,
    while a read that goes backwards (re-reading a superblock, a directory
    block) is random access and gets no read-ahead.
    """

    def __init__(self, chunk_size: int, max_window: int, *, streams: int = 8) -> None:
        self.chunk_size = chunk_size
        self.max_chunks = max(0, max_window // chunk_size)
        self.slack = chunk_size
        self.max_streams = streams
        self._streams: OrderedDict[tuple[int, int], int] = OrderedDict()  # (start, end) → window (chunks)

    def observe(self, offset: int, length: int) -> int:
        """Record a read; return how many chunks past its last chunk to prefetch."""
        end = offset + length
        window = 0
        for key in reversed(self._streams):
            start, expected = key
            if start < offset <= expected + self.slack and end > expected:
                window = min(self.max_chunks, max(RAMP_FIRST, self._streams.pop(key) * RAMP_GROWTH))
                break
        self._streams[(offset, end)] = window
        self._streams.move_to_end((offset, end))
        while len(self._streams) > self.max_streams:
            self._streams.popitem(last=False)
        return window
