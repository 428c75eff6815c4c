import random

import pytest
from hypothesis import given, strategies as st

from erofs_mount.sources.cache import ChunkCache, ReadAhead, assemble, chunk_extent, chunk_range, clamp, runs
from erofs_mount.sources.retry import RetryPolicy, parse_retry_after


def test_clamp_and_ranges():
    assert clamp(0, 10, 5) == (0, 5) and clamp(5, 10, 5) == (5, 0) and clamp(9, 1, 5) == (9, 0)
    with pytest.raises(ValueError):
        clamp(-1, 1, 5)
    assert list(chunk_range(0, 1, 4)) == [0] and list(chunk_range(3, 2, 4)) == [0, 1]
    assert list(chunk_range(4, 4, 4)) == [1]
    assert chunk_extent(2, 4, 10) == (8, 10)
    assert runs([5, 1, 2, 3, 7, 8, 2], 2) == [(1, 2), (3, 1), (5, 1), (7, 2)]
    assert runs([], 4) == []


@given(st.integers(0, 300), st.integers(1, 300), st.sampled_from([1, 7, 16, 64]))
def test_assemble_matches_slice(offset, length, cs):
    blob = bytes(random.Random(1).randbytes(600))
    size = len(blob)
    offset, length = clamp(offset, length, size)
    chunks = {i: blob[i * cs:(i + 1) * cs] for i in range(size // cs + 1)}
    assert assemble(chunks, offset, length, cs) == blob[offset:offset + length]


def test_lru():
    c = ChunkCache(10)
    c.put(1, b"aaaa")
    c.put(2, b"bbbb")
    assert c.get(1) == b"aaaa"  # 1 is now most recent
    c.put(3, b"cccc")  # evicts 2
    assert c.get(2) is None and 1 in c and 3 in c and c.used == 8 and c.evictions == 1
    c.put(4, b"x" * 11)  # larger than the cache: ignored
    assert 4 not in c
    c.put(1, b"zz")
    assert c.used == 6 and c.peek(1) == b"zz"
    assert (c.hits, c.misses) == (1, 1)


def test_readahead():
    ra = ReadAhead(chunk_size=100, max_window=6400)  # 64 chunks at most
    assert ra.observe(5000, 10) == 0  # random read: nothing
    assert ra.observe(0, 100) == 0  # a first read, even at 0, is not a stream yet
    assert [ra.observe(o, 100) for o in range(100, 600, 100)] == [4, 16, 64, 64, 64]  # x4 ramp
    assert ra.observe(90000, 100) == 0  # somewhere else
    assert ra.observe(600, 100) == 64  # the first stream continues
    assert ra.observe(90100, 100) == 4
    assert ra.observe(750, 50) == 64  # a small gap (< one chunk) still counts
    assert ReadAhead(chunk_size=100, max_window=200).observe(0, 1) == 0
    small = ReadAhead(chunk_size=100, max_window=200)
    small.observe(0, 100)
    assert small.observe(100, 100) == 2  # capped by the window


def test_readahead_backwards_is_random():
    ra = ReadAhead(chunk_size=1000, max_window=8000)
    ra.observe(0, 1028)  # magic check
    assert ra.observe(0, 65536) == 0  # re-reading from the start: not sequential
    assert ra.observe(500, 100) == 0  # backwards inside the last read
    ra2 = ReadAhead(chunk_size=1000, max_window=8000)
    ra2.observe(10_000, 1000)
    assert ra2.observe(10_500, 1000) == 4  # overlapping forward read continues


def test_readahead_interleaved_streams_bounded():
    ra = ReadAhead(chunk_size=100, max_window=400, streams=2)
    ra.observe(1000, 100)
    ra.observe(5000, 100)
    ra.observe(9000, 100)  # forgets the 1000 stream
    assert ra.observe(1100, 100) == 0
    assert ra.observe(5100, 100) == 0  # also forgotten by now (2 streams max)
    ra = ReadAhead(chunk_size=100, max_window=3200, streams=4)
    ra.observe(1000, 100)
    ra.observe(5000, 100)
    assert (ra.observe(1100, 100), ra.observe(5100, 100), ra.observe(1200, 100), ra.observe(5200, 100)) == (4, 4, 16, 16)


def test_retry_policy():
    p = RetryPolicy(retries=3, total=10, base=1, cap=4, rng=random.Random(0))
    delays = [p.delay(i, None, 0) for i in (1, 2, 3)]
    assert all(0 <= d <= c for d, c in zip(delays, (1, 2, 4)))
    assert p.delay(4, None, 0) is None  # out of attempts
    assert p.delay(1, None, 10) is None  # out of time
    assert p.delay(1, 3.0, 0) == 3.0
    assert p.delay(1, 30.0, 0) is None  # Retry-After beyond the budget


def test_retry_after():
    assert parse_retry_after("2", 0) == 2.0
    assert parse_retry_after(None, 0) is None and parse_retry_after("soon", 0) is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", 1445412475.0) == 5.0
