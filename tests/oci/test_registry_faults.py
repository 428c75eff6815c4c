"""Fault injection on real sockets: a trio + h11 proxy between the client and a real registry.

Every read returns the right bytes, or (faults that never stop) EIO within the configured bound."""

import errno

import pytest
import trio

from erofs_mount.errors import NetworkError, SourceError
from erofs_mount.sources.oci.blob import open_oci_source
from erofs_mount.sources.oci.options import OciOptions

from tests.oci._faultproxy import Fault, FaultProxy
from tests.oci._servers import env_with

pytestmark = pytest.mark.trio
KiB = 1024
MiB = 1 << 20
# small timeouts so stalls are detected quickly; bounded retries
OPTS = OciOptions(insecure=True, chunk_size=64 * KiB, readahead=0, timeout=0.5, retries=6, retry_time=8.0)
HARD_LIMIT = 30  # no test may take longer than this (a hang fails instead of blocking the suite)


@pytest.fixture
async def proxy(world, nursery):
    p = FaultProxy("127.0.0.1", world.registry.port)
    await nursery.start(p.serve)
    return p


async def open_big(world, proxy, opts=OPTS):
    return await open_oci_source(f"{proxy.host}/team/big:v1", options=opts, env=env_with())


FAULTS = {
    "500": Fault("status", status=500),
    "502": Fault("status", status=502),
    "503": Fault("status", status=503),
    "429-retry-after": Fault("status", status=429, retry_after="1"),
    "close-before-response": Fault("close"),
    "reset-before-response": Fault("reset"),
    "reset-mid-body": Fault("reset_mid_body", fraction=0.3),
    "truncated-body": Fault("truncate", fraction=0.6),
    "stalled-headers": Fault("stall_headers", seconds=5),
    "stalled-body": Fault("stall_body", fraction=0.5, seconds=5),
    "range-ignored": Fault("drop_range"),
    "slow-body": Fault("slow_body"),
}


@pytest.mark.parametrize("name", list(FAULTS))
async def test_transient_fault_recovers(world, proxy, name):
    big = world.blobs["big"]
    with trio.fail_after(HARD_LIMIT):
        src = await open_big(world, proxy)
        try:
            proxy.faults.extend([FAULTS[name], FAULTS[name]])  # the next two blob GETs fail
            off = 5 * (1 << 20) + 12345
            assert await src.read_at(off, 100 * KiB) == big[off:off + 100 * KiB]
            s = src.stats()
            if name in ("range-ignored", "slow-body"):  # not failures: handled in place
                assert s["retries"] == 0
                if name == "range-ignored":
                    assert s["range_ignored"] == 1  # one GET for the run of chunks
            else:
                assert s["retries"] >= 2
            # the connection pool still works afterwards (and absorbs the second fault)
            assert await src.read_at(2 << 20, 1000) == big[2 << 20:(2 << 20) + 1000]
            assert not proxy.faults
        finally:
            await src.aclose()


@pytest.mark.parametrize("name", ["503", "reset-mid-body", "truncated-body", "stalled-headers", "stalled-body",
                                  "close-before-response"])
async def test_permanent_fault_gives_eio_in_bound(world, proxy, name, caplog):
    opts = OciOptions(insecure=True, chunk_size=64 * KiB, readahead=0, timeout=0.4, retries=3, retry_time=2.0)
    with trio.fail_after(HARD_LIMIT):
        src = await open_big(world, proxy, opts)
        try:
            proxy.always = FAULTS[name]
            start = trio.current_time()
            with pytest.raises(NetworkError) as ei:
                await src.read_at(3 << 20, 1000)
            elapsed = trio.current_time() - start
            assert ei.value.errno == errno.EIO and isinstance(ei.value, SourceError)
            assert "gave up" in str(ei.value)
            assert elapsed < opts.retry_time + 2 * opts.timeout + 1  # the configured bound, not a timing test of speed
            assert any("gave up" in r.message for r in caplog.records if r.levelname == "ERROR")
            proxy.always = None
            assert await src.read_at(3 << 20, 1000) == world.blobs["big"][3 << 20:(3 << 20) + 1000]  # recovers
        finally:
            await src.aclose()


async def test_range_ignored_always_still_exact(world, proxy):
    proxy.always = Fault("drop_range")
    big = world.blobs["big"]
    with trio.fail_after(HARD_LIMIT):
        src = await open_big(world, proxy, OciOptions(insecure=True, chunk_size=256 * KiB, readahead=0))
        try:
            for off in (0, 4 << 20, (8 << 20) - 300):
                assert await src.read_at(off, 70000) == big[off:off + 70000]
            assert src.stats()["range_ignored"] >= 3
        finally:
            await src.aclose()


async def test_faults_with_concurrency_and_readahead(world, proxy):
    """Random faults while several readers stream with read-ahead: no wrong byte, no hang."""
    import random

    rng = random.Random(5)
    # read-ahead streams ask for the rest of the blob and read only what their reader needs:
    # body faults cut early enough (5%) to hit inside what is read
    kinds = {"503": FAULTS["503"], "reset-mid-body": Fault("reset_mid_body", fraction=0.05),
             "truncated-body": Fault("truncate", fraction=0.05), "reset-before-response": FAULTS["reset-before-response"],
             "500": FAULTS["500"], "range-ignored": FAULTS["range-ignored"]}
    opts = OciOptions(insecure=True, chunk_size=64 * KiB, readahead=512 * KiB, timeout=0.5, retries=8, retry_time=10)
    big = world.blobs["big"]
    with trio.fail_after(HARD_LIMIT * 2):
        src = await open_big(world, proxy, opts)
        try:
            proxy.faults.append(FAULTS["503"])  # at least one retry for sure
            proxy.faults.extend(rng.choice(list(kinds.values())) if rng.random() < 0.7 else Fault("none")
                                for _ in range(60))

            async def stream(start):
                for off in range(start, start + (1 << 20), 48 * KiB):
                    assert await src.read_at(off, 48 * KiB) == big[off:off + 48 * KiB]

            async with trio.open_nursery() as n:
                for k in range(4):
                    n.start_soon(stream, k * (2 << 20))
            assert src.stats()["retries"] > 0 and src.stats()["streams"] > 0
        finally:
            await src.aclose()


async def test_retry_after_partial_body_asks_only_for_the_rest(world, proxy):
    """Chunks that arrived before a reset are delivered; the retry's Range starts after them."""
    KiB64 = 64 * KiB
    opts = OciOptions(insecure=True, chunk_size=KiB64, readahead=0, timeout=0.5, retries=4, retry_time=8.0)
    big = world.blobs["big"]
    with trio.fail_after(HARD_LIMIT):
        src = await open_big(world, proxy, opts)
        try:
            off = 4 << 20
            n0 = len(proxy.ranges)
            proxy.faults.append(Fault("reset_mid_body", fraction=0.6))
            assert await src.read_at(off, 8 * KiB64) == big[off:off + 8 * KiB64]  # one run of 8 chunks
            ranges = proxy.ranges[n0:]
            assert ranges[0] == f"bytes={off}-{off + 8 * KiB64 - 1}"
            assert len(ranges) == 2 and ranges[1].endswith(f"-{off + 8 * KiB64 - 1}")
            resumed = int(ranges[1][6:].split("-")[0])
            assert off < resumed <= off + 5 * KiB64 and (resumed - off) % KiB64 == 0
        finally:
            await src.aclose()


async def test_reader_never_waits_behind_a_slow_stream(world, proxy):
    """A reader needing a chunk its read-ahead stream reaches only much later (a slow body, a
    jump ahead inside the window) fetches that chunk itself at once instead of waiting."""
    opts = OciOptions(insecure=True, chunk_size=64 * KiB, readahead=8 * MiB)
    big = world.blobs["big"]
    with trio.fail_after(HARD_LIMIT):
        src = await open_big(world, proxy, opts)
        try:
            # the first read's GET is normal, the stream that follows trickles (16 KiB per 10 ms)
            proxy.faults.extend([Fault("none"), Fault("slow_body")])
            for off in range(MiB, MiB + 5 * 64 * KiB, 64 * KiB):  # a sequential reader: its window grows
                assert await src.read_at(off, 64 * KiB) == big[off:off + 64 * KiB]
            s = src.stats()
            assert s["streams"] == 1 and s["prefetched_chunks"] > 64  # the window reaches far ahead
            far = 7 * MiB + 100
            assert await src.read_at(far, 100) == big[far:far + 100]
            assert src.stats()["promoted"] >= 1
        finally:
            await src.aclose()
