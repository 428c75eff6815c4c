"""Sequential read-ahead through ONE long streaming Range GET (oci/stream.py), against the real registry,
faults injected by the proxy on real sockets.  Bounds are counts from stats() and the proxy's log, never
timings; every test has a hard time limit so that a hang fails instead of blocking the suite."""

import errno

import pytest
import trio

from erofs_mount.errors import SourceError
from erofs_mount.sources.oci.blob import open_oci_source
from erofs_mount.sources.oci.options import OciOptions
from erofs_mount.sources.oci.stream import DROP_LAG

from tests.oci._faultproxy import Fault, FaultProxy
from tests.oci._servers import env_with

pytestmark = pytest.mark.trio
KiB = 1024
MiB = 1 << 20
CS = 64 * KiB
HARD_LIMIT = 30


@pytest.fixture
async def proxy(world, nursery):
    p = FaultProxy("127.0.0.1", world.registry.port)
    await nursery.start(p.serve)
    return p


async def open_big(ref_host: str, **kw):
    opts = OciOptions(insecure=True, chunk_size=CS, **kw)
    return await open_oci_source(f"{ref_host}/team/big:v1", options=opts, env=env_with())


async def read_seq(src, big: bytes, start: int, end: int, step: int) -> None:
    for off in range(start, end, step):
        n = min(step, end - off)
        assert await src.read_at(off, n) == big[off:off + n], off


async def wait_until(cond, what: str, limit: float = 10.0) -> None:
    """Poll (bounded in time) until cond() holds; no assertion on how long it took."""
    with trio.fail_after(limit):
        while not cond():
            await trio.sleep(0.02)


def blob_gets(proxy: FaultProxy, since: int) -> list[str | None]:
    return [r for (m, t, _), r in zip(proxy.log[since:], proxy.ranges[since:]) if m == "GET" and "/blobs/" in t]


async def test_sequential_read_is_one_stream(world):
    """The whole 8 MiB blob read sequentially: right bytes, one read-ahead GET, nothing fetched twice."""
    big = world.blobs["big"]
    with trio.fail_after(HARD_LIMIT):
        src = await open_big(world.registry.host)
        try:
            before = src.stats()
            await read_seq(src, big, 0, len(big), 48 * KiB)  # reads straddle chunk boundaries
            s = src.stats()
            assert s["streams"] == 1 and s["requests"] - before["requests"] <= 2  # first read's GET + the stream
            assert s["bytes_fetched"] == len(big)  # every byte exactly once (chunk 0 came with the magic check)
            assert s["prefetched_chunks"] > 0 and s["fetch_failures"] == 0 and s["retries"] == 0
            # drop-behind: what the reader passed left the cache, but the last DROP_LAG (+ the
            # chunks of the last read, + chunk 0 of the magic check, not the stream's)
            assert s["dropped_behind"] > 0 and s["cache_bytes"] <= DROP_LAG + 4 * CS
            await wait_until(lambda: src.stats()["streams_active"] == 0, "the Range ended with the blob")
        finally:
            await src.aclose()


async def test_stream_asks_for_the_rest_and_pauses_a_window_ahead(world, proxy):
    """The stream's Range runs to the end of the blob, but the bytes read from the socket stop a
    window ahead of the reader (backpressure), and the stream ends when its reader leaves."""
    big = world.blobs["big"]
    with trio.fail_after(HARD_LIMIT):
        src = await open_big(proxy.host, readahead=MiB, timeout=0.5)
        try:
            n0 = len(proxy.log)
            start, end = 2 * MiB, 3 * MiB
            await read_seq(src, big, start, end, CS)
            gets = blob_gets(proxy, n0)
            assert len(gets) == 2 and gets[1].endswith(f"-{len(big) - 1}")  # the first read's GET, then the stream
            assert src.stats()["streams_active"] == 1
            await wait_until(lambda: src.stats()["streams_active"] == 0, "idle stream ends")  # paused > oci.timeout
            s = src.stats()
            # the chunk 0 of the magic check, what was read, at most the window and a socket read beyond
            net = s["bytes_fetched"] + s["bytes_discarded"]  # delivered, and received but dropped
            assert net <= CS + (end - start) + MiB + 2 * CS, net
            assert s["fetch_failures"] == 0
            # the reader comes back: a new stream (the dropped chunks are fetched again), right bytes
            await read_seq(src, big, end, end + MiB, CS)
            assert src.stats()["streams"] == 2
        finally:
            await src.aclose()


async def test_seek_away_stops_the_stream(world, proxy):
    """With one connection, a sequential reader elsewhere replaces the stream: the old one stops
    at once and the bytes fetched stay bounded by what was read plus a window per stream."""
    big = world.blobs["big"]
    with trio.fail_after(HARD_LIMIT):
        src = await open_big(proxy.host, readahead=512 * KiB, connections=1)
        try:
            await read_seq(src, big, MiB, MiB + 512 * KiB, CS)
            await read_seq(src, big, 5 * MiB, 5 * MiB + 512 * KiB, CS)
            s = src.stats()
            assert s["streams"] == 2 and s["streams_active"] == 1
            # random reads far away start no stream and fetch one chunk each
            for off in (7 * MiB + 5, 3 * MiB + 7, 200 * KiB):
                assert await src.read_at(off, 100) == big[off:off + 100]
            s = src.stats()
            # the chunk of the magic check; per stream what was read, its window, a socket read
            # past it; a chunk per random read
            net = s["bytes_fetched"] + s["bytes_discarded"]
            assert s["streams"] == 2 and net <= CS + 2 * (2 * 512 * KiB + 2 * CS) + 3 * CS, net
        finally:
            await src.aclose()
            assert src.stats()["streams_active"] == 0


@pytest.mark.parametrize("fault", [
    Fault("reset_mid_body", fraction=0.2), Fault("truncate", fraction=0.2), Fault("stall_body", fraction=0.2, seconds=5),
    Fault("status", status=503), Fault("drop_range"),
], ids=lambda f: f.kind)
async def test_stream_fault_resumes_with_right_bytes(world, proxy, fault):
    """The stream GET broken mid-body (reset, FIN, stall), refused, or answered 200 with the whole
    blob: the reader gets the right bytes, and a resumed stream asks from the first missing chunk."""
    big = world.blobs["big"]
    with trio.fail_after(HARD_LIMIT):
        src = await open_big(proxy.host, timeout=0.5, retries=4, retry_time=8)
        try:
            n0 = len(proxy.log)
            proxy.faults.extend([Fault("none"), fault])  # the first read's GET is fine, the stream's is not
            await read_seq(src, big, MiB, len(big), 96 * KiB)
            gets = blob_gets(proxy, n0)
            s = src.stats()
            assert s["streams"] == 1
            if fault.kind == "drop_range":
                assert s["range_ignored"] == 1 and len(gets) == 2
            else:
                assert s["retries"] >= 1 and len(gets) >= 3
                stream_from = int(gets[1][6:].split("-")[0])
                resumed = int(gets[2][6:].split("-")[0])
                assert gets[2].endswith(f"-{len(big) - 1}")
                assert resumed % CS == 0 and stream_from <= resumed
                if fault.kind != "status":  # a body cut at 20% of the rest: the chunks before it were kept
                    assert resumed > stream_from
        finally:
            await src.aclose()


@pytest.mark.parametrize("fault", [
    Fault("reset_mid_body", fraction=0.0), Fault("truncate", fraction=0.0), Fault("status", status=503),
], ids=lambda f: f.kind)
async def test_faults_that_never_stop_give_eio_within_the_bound(world, proxy, fault):
    """Every attempt of the stream fails: the reader waiting for its own chunk from it gets EIO once
    the stream's retries run out (no second round of its own), and reads work again afterwards."""
    big = world.blobs["big"]
    with trio.fail_after(HARD_LIMIT):
        src = await open_big(proxy.host, timeout=0.3, retries=3, retry_time=3)
        try:
            proxy.faults.append(Fault("none"))  # the first read's GET
            proxy.always = fault
            with pytest.raises(SourceError) as ei:
                await read_seq(src, big, MiB, 2 * MiB, CS)
            assert ei.value.errno == errno.EIO
            s = src.stats()
            assert s["streams"] == 1 and s["failures"] == 1 and s["fetch_failures"] >= 1
            assert s["requests"] - 2 == 1 + 4  # the first read's GET, the stream's 1 + 3 retries
            proxy.always = None
            off = 6 * MiB + 3  # once the registry answers again, reads work
            assert await src.read_at(off, 1000) == big[off:off + 1000]
        finally:
            proxy.always = None
            await src.aclose()


async def test_stalled_stream_gives_eio_within_the_bound(world, proxy):
    """A stream whose every attempt stalls mid-body: the reader waiting for it gets EIO (bounded by
    retries and the stall timeout), not a hang."""
    big = world.blobs["big"]
    with trio.fail_after(HARD_LIMIT):
        src = await open_big(proxy.host, timeout=0.3, retries=2, retry_time=4)
        try:
            proxy.faults.append(Fault("none"))
            proxy.always = Fault("stall_body", fraction=0.0, seconds=60)
            with pytest.raises(SourceError) as ei:
                await read_seq(src, big, MiB, len(big), CS)
            assert ei.value.errno == errno.EIO and src.stats()["streams"] >= 1
        finally:
            proxy.always = None
            await src.aclose()


async def test_memory_stays_bounded(world):
    """A cache smaller than the read-ahead asked for: the window is capped at half the cache, the
    cache never exceeds its limit, nothing is fetched twice, bytes are right."""
    big = world.blobs["big"]
    limit = 512 * KiB
    with trio.fail_after(HARD_LIMIT):
        src = await open_big(world.registry.host, readahead=8 * MiB, memory_limit=limit)
        try:
            peak = 0
            for off in range(0, len(big), 40 * KiB):
                n = min(40 * KiB, len(big) - off)
                assert await src.read_at(off, n) == big[off:off + n]
                s = src.stats()
                peak = max(peak, s["cache_bytes"])
                assert len(src._inflight) * CS <= limit // 2 + 2 * CS  # the window: half the cache
            s = src.stats()
            assert peak <= limit and s["bytes_fetched"] == len(big) and s["streams"] == 1
        finally:
            await src.aclose()


async def test_interleaved_readers_and_close_while_paused(world):
    """Three sequential readers interleaved (more than oci.connections streams), plus random reads:
    every byte right, streams bounded by connections; aclose() with paused streams returns."""
    import random

    big = world.blobs["big"]
    rng = random.Random(3)
    with trio.fail_after(HARD_LIMIT * 2):
        src = await open_big(world.registry.host, readahead=MiB, connections=2, memory_limit=4 * MiB)
        try:
            most = 0

            async def reader(start):
                nonlocal most
                for off in range(start, start + 2 * MiB, 56 * KiB):
                    n = min(56 * KiB, len(big) - off)
                    assert await src.read_at(off, n) == big[off:off + n]
                    most = max(most, src.stats()["streams_active"])

            async def random_reader():
                for _ in range(40):
                    off, n = rng.randrange(len(big)), rng.randrange(1, 20 * KiB)
                    assert await src.read_at(off, n) == big[off:off + n]

            async with trio.open_nursery() as n:
                for k in range(3):
                    n.start_soon(reader, k * (2 * MiB) + 1000)
                n.start_soon(random_reader)
            assert 1 <= most <= 2 and src.stats()["streams"] >= 3
        finally:
            await src.aclose()
        assert src.stats()["streams_active"] == 0 and not src._inflight
        with pytest.raises(SourceError):
            await src.read_at(0, 1)


async def test_persistent_cache_is_not_refetched_by_a_stream(world, tmp_path):
    """A stream stops where the persistent cache already holds chunks: a second pass over a partly
    cached blob fetches only what is missing."""
    big = world.blobs["big"]
    opts = dict(cache=str(tmp_path / "cache"), cache_limit=64 * MiB)
    with trio.fail_after(HARD_LIMIT):
        src = await open_big(world.registry.host, readahead=MiB, **opts)
        try:
            await read_seq(src, big, 2 * MiB, 4 * MiB, 40 * KiB)  # a stream fills [2, 4) MiB (+ its window)
            assert src.stats()["streams_active"] == 1  # paused a window ahead, a socket read held
            # everything counted as fetched ends up in the persistent cache (a piece the paused
            # stream holds is counted once used or dropped)
            await wait_until(lambda: src.stats()["disk_bytes_written"] >= src.stats()["bytes_fetched"],
                             "the persistent cache catches up")
        finally:
            await src.aclose()
        cached = src.stats()["disk_bytes_written"]
        src = await open_big(world.registry.host, **opts)
        try:
            await read_seq(src, big, 0, len(big), CS)
            s = src.stats()
            assert s["disk_hits"] > 0 and s["bytes_fetched"] <= len(big) - cached + CS
        finally:
            await src.aclose()


async def test_what_a_stream_dropped_is_not_prefetched_again(world, proxy):
    """Chunks a stream brought and dropped behind its reader are not fetched again by another
    reader's read-ahead (a new stream stops where they start); a reader coming back into them
    reads the right bytes and gets a stream again."""
    big = world.blobs["big"]
    with trio.fail_after(HARD_LIMIT):
        src = await open_big(proxy.host, readahead=MiB)
        try:
            await read_seq(src, big, MiB, 4 * MiB, CS)  # reader A: chunks 16..63
            lag = DROP_LAG // CS
            # chunk 16 came with A's first read; the stream brought 17.., dropped 17 .. 63-lag
            assert src.stats()["dropped_behind"] == 63 - lag - 17
            # reader B inside one cached chunk just before: its window reaches the dropped chunks
            n0 = len(proxy.log)
            b_off = 10 * CS
            for off in range(b_off, b_off + CS, 8 * KiB):
                assert await src.read_at(off, 8 * KiB) == big[off:off + 8 * KiB]
            await wait_until(lambda: len(blob_gets(proxy, n0)) >= 2, "B's read-ahead stream asks")
            gets = blob_gets(proxy, n0)
            assert gets[0] == f"bytes={b_off}-{b_off + CS - 1}"  # B's own chunk
            assert gets[1:] == [f"bytes={11 * CS}-{16 * CS - 1}"]  # read-ahead up to the dropped chunks only
            # a reader coming back into them: right bytes, streamed again
            await read_seq(src, big, 20 * CS, 30 * CS, CS)
            gets = blob_gets(proxy, n0)
            assert any(r.startswith(f"bytes={21 * CS}-") or r.startswith(f"bytes={20 * CS}-") for r in gets[2:])
            assert src.stats()["streams"] >= 3
        finally:
            await src.aclose()


async def test_another_reader_inside_the_window_drops_nothing_unread(world, proxy):
    """Found under the kernel (NBD): reader A's growing window let its stream run far ahead; an
    unrelated read inside that window must not be taken for A and drop what A has not read yet."""
    big = world.blobs["big"]
    with trio.fail_after(HARD_LIMIT):
        src = await open_big(proxy.host, readahead=4 * MiB)
        try:
            for off in range(0, 5 * 8 * KiB, 8 * KiB):  # reader A in chunk 0: its window grows to 64 chunks
                assert await src.read_at(off, 8 * KiB) == big[off:off + 8 * KiB]
            await wait_until(lambda: all(i in src.cache for i in range(1, 40)), "the stream fills A's window")
            requests = src.stats()["requests"]
            for off in range(30 * CS, 30 * CS + 3 * 8 * KiB, 8 * KiB):  # reader X, sequential, inside the window
                assert await src.read_at(off, 8 * KiB) == big[off:off + 8 * KiB]
            assert src.stats()["dropped_behind"] == 0
            await read_seq(src, big, 5 * 8 * KiB, 20 * CS, CS)  # A goes on: all from the cache
            s = src.stats()
            assert s["requests"] == requests and s["bytes_fetched"] <= len(big)
        finally:
            await src.aclose()


async def test_assemble_and_discard_pure():
    """(Pure) assemble cuts across chunks in one copy and hands a whole immutable chunk back as is;
    discard frees a chunk's bytes without counting an eviction."""
    from erofs_mount.sources.cache import ChunkCache, assemble

    chunks = {0: b"a" * 8, 1: bytearray(b"b" * 8), 2: memoryview(b"c" * 8)}
    assert assemble(chunks, 6, 12, 8) == b"aa" + b"b" * 8 + b"cc"
    assert assemble(chunks, 0, 8, 8) is chunks[0]  # no copy at all
    assert assemble(chunks, 9, 3, 8) == b"bbb" and type(assemble(chunks, 8, 8, 8)) is bytes
    c = ChunkCache(24)
    for i in range(3):
        c.put(i, b"x" * 8)
    assert c.discard(1) and not c.discard(1) and c.used == 16 and c.evictions == 0
    assert list(c.indexes()) == [0, 2]
