"""OciBlobSource against a real docker-registry (anonymous, plain HTTP)."""

import random

import pytest
import trio

from erofs_mount.errors import CorruptedError, NotErofsError, RegistryError, SourceError, UnsupportedError, UsageError
from erofs_mount.sources import Source
from erofs_mount.sources.bridge import SyncReadAt
from erofs_mount.sources.oci.blob import open_oci_source
from erofs_mount.sources.oci.options import OciOptions

pytestmark = pytest.mark.trio
INSECURE = OciOptions(insecure=True)
KiB, MiB = 1024, 1 << 20


async def read_all(src, piece=MiB):
    out = bytearray()
    for off in range(0, src.size, piece):
        out += await src.read_at(off, piece)
    return bytes(out)


async def test_resolve_layer_and_pin(world):
    src = await open_oci_source(world.ref("team/app:v1"), options=INSECURE, layer=0)
    try:
        assert isinstance(src, Source)
        assert src.digest == world.digests["A"] and src.size == len(world.blobs["A"])
        assert src.layer_index == 0 and src.media_type == "application/vnd.erofs"
        assert src.ref.digest == world.manifests["team/app:v1"] and src.ref.tag == "v1"
        assert src.platform == "linux/amd64"
        assert await read_all(src) == world.blobs["A"]
        s = src.stats()
        assert s["bytes_fetched"] >= src.size and s["requests"] >= 2 and s["retries"] == 0
    finally:
        await src.aclose()


@pytest.mark.parametrize("kw, blob", [({"layer": 2}, "B"), ({"blob": "B"}, "B"), ({"layer": 0}, "A")])
async def test_select_layer(world, kw, blob):
    if "blob" in kw:
        kw = {"blob": world.digests[kw["blob"]]}
    src = await open_oci_source(world.ref("team/app:v1"), options=INSECURE, **kw)
    try:
        assert src.digest == world.digests[blob]
        assert await src.read_at(0, 8192) == world.blobs[blob][:8192]
    finally:
        await src.aclose()


async def test_refusals(world):
    with pytest.raises(UsageError, match="3 layers"):
        await open_oci_source(world.ref("team/app:v1"), options=INSECURE, layer=3)
    with pytest.raises(UsageError, match="3 layers"):  # no choice given and two EROFS layers
        await open_oci_source(world.ref("team/app:v1"), options=INSECURE)
    with pytest.raises(CorruptedError, match=r"layer 1 .*gzip: incorrect header check at compressed offset"):
        await open_oci_source(world.ref("team/app:v1"), options=INSECURE, layer=1)  # tar+gzip, not gzip
    with pytest.raises(NotErofsError, match="offset 1024"):
        await open_oci_source(world.ref("team/notmagic:v1"), options=INSECURE)
    with pytest.raises(UnsupportedError, match="chunk index"):
        await open_oci_source(world.ref("team/zstd:v1"), options=INSECURE)
    with pytest.raises(RegistryError, match="not found"):
        await open_oci_source(world.ref("team/app:nope"), options=INSECURE)
    with pytest.raises(RegistryError, match="not found"):
        await open_oci_source(world.ref("team/none:v1"), options=INSECURE)
    with pytest.raises(RegistryError, match="not a layer"):
        await open_oci_source(world.ref("team/app:v1"), options=INSECURE, blob=world.digests["Z"])


@pytest.mark.parametrize("repo", ["team/multi:v1", "team/dlist:v1"])
@pytest.mark.parametrize("plat, blob", [("linux/arm64", "Z"), ("linux/arm64/v8", "Z"), (None, None)])
async def test_platforms(world, repo, plat, blob):
    if blob is None:  # this host (amd64): the OCI index prefers the os.features=erofs entry
        blob = "D" if repo == "team/multi:v1" else "B"
    src = await open_oci_source(world.ref(repo), options=INSECURE, platform=plat)
    try:
        assert src.digest == world.digests[blob]
        assert src.platform == (plat if plat != "linux/arm64" else "linux/arm64/v8") if plat else src.platform == "linux/amd64"
        assert await src.read_at(1000, 100) == world.blobs[blob][1000:1100]
        assert src.manifest_digest != src.ref.digest  # pinned to the index, manifest resolved under it
    finally:
        await src.aclose()


async def test_platform_missing(world):
    with pytest.raises(RegistryError, match="linux/s390x.*available: linux/amd64, linux/arm64/v8"):
        await open_oci_source(world.ref("team/multi:v1"), options=INSECURE, platform="linux/s390x")


async def test_digest_reference(world):
    d = world.manifests["team/app:v1"]
    src = await open_oci_source(f"{world.ref('team/app')}@{d}", options=INSECURE, layer=2)
    try:
        assert src.digest == world.digests["B"] and src.ref.digest == d
    finally:
        await src.aclose()
    with pytest.raises(RegistryError):
        await open_oci_source(f"{world.ref('team/app')}@sha256:{'0' * 64}", options=INSECURE)


async def test_moved_tag_keeps_pinned_digest(world):
    opts = OciOptions(insecure=True, chunk_size=64 * KiB, memory_limit=128 * KiB, readahead=0)
    src = await open_oci_source(world.ref("team/moving:v1"), options=opts)
    try:
        first = src.ref.digest
        world.pusher.image("team/moving", "v1", [("application/vnd.erofs", world.blobs["B"])])
        assert await read_all(src, 100 * KiB) == world.blobs["A"]  # still the pinned blob, bytes from the wire
        again = await open_oci_source(world.ref("team/moving:v1"), options=INSECURE)
        assert again.digest == world.digests["B"] and again.ref.digest != first
        await again.aclose()
        pinned = await open_oci_source(str(src.ref), options=INSECURE)  # the pinned ref reattaches to A
        assert pinned.digest == world.digests["A"]
        await pinned.aclose()
    finally:
        world.pusher.image("team/moving", "v1", [("application/vnd.erofs", world.blobs["A"])])
        await src.aclose()


async def test_coalescing_and_clamping(world):
    opts = OciOptions(insecure=True, chunk_size=256 * KiB, readahead=0)
    src = await open_oci_source(world.ref("team/big:v1"), options=opts)
    big = world.blobs["big"]
    try:
        before = src.stats()["requests"]
        results = {}

        async def reader(k):
            results[k] = await src.read_at(3 * MiB + k * 100, 5000)

        async with trio.open_nursery() as n:
            for k in range(20):
                n.start_soon(reader, k)
        assert all(results[k] == big[3 * MiB + k * 100:3 * MiB + k * 100 + 5000] for k in range(20))
        s = src.stats()
        assert s["requests"] - before == 1 and s["coalesced"] >= 19
        assert await src.read_at(src.size - 10, 100) == big[-10:]
        assert await src.read_at(src.size, 100) == b"" and await src.read_at(src.size + 5, 1) == b""
        assert await src.read_at(0, 0) == b""
        assert await src.read_at(src.size - MiB - 7, 2 * MiB) == big[-MiB - 7:]
    finally:
        await src.aclose()


async def test_sequential_readahead_and_random(world):
    opts = OciOptions(insecure=True, chunk_size=128 * KiB, readahead=2 * MiB, memory_limit=4 * MiB)
    src = await open_oci_source(world.ref("team/big:v1"), options=opts)
    big = world.blobs["big"]
    try:
        assert await read_all(src, 32 * KiB) == big
        s = src.stats()
        assert s["prefetched_chunks"] > 0 and s["cache_hits"] > 0 and s["streams"] >= 1
        # what the stream brought left the cache behind the reader: no eviction was needed
        assert s["dropped_behind"] > 0 and s["cache_bytes"] <= 4 * MiB
        rng = random.Random(3)
        for _ in range(100):
            off, n = rng.randrange(src.size), rng.randrange(1, 300 * KiB)
            assert await src.read_at(off, n) == big[off:off + n]
    finally:
        await src.aclose()


async def test_small_blob_one_chunk(world):
    src = await open_oci_source(world.ref("team/small:v1"), options=INSECURE)
    try:
        assert src.size == 5000 and await src.read_at(0, 10**6) == world.blobs["small"]
    finally:
        await src.aclose()


async def test_sync_bridge(world):
    src = await open_oci_source(world.ref("team/app:v1"), options=INSECURE, layer=0)
    try:
        bridge = SyncReadAt.here(src)
        got = await trio.to_thread.run_sync(lambda: [bridge.read_at(o, 4096) for o in (0, 5000, 2 * MiB)])
        assert got == [world.blobs["A"][o:o + 4096] for o in (0, 5000, 2 * MiB)]
    finally:
        await src.aclose()


async def test_closed_source(world):
    src = await open_oci_source(world.ref("team/small:v1"), options=INSECURE)
    await src.aclose()
    await src.aclose()
    with pytest.raises(SourceError):
        await src.read_at(0, 1)


async def test_every_corpus_image_byte_exact(world):
    """Each corpus image read through the registry equals the local file (the reader-level check is issue 7)."""
    for name, ci in world.corpus.items():
        if name == "corrupt-bad-magic":
            with pytest.raises(NotErofsError):
                await open_oci_source(world.ref(f"corpus/{name}:v1"), options=INSECURE, layer=0)
            continue
        src = await open_oci_source(world.ref(f"corpus/{name}:v1"), options=INSECURE, layer=0)
        try:
            assert await read_all(src, 256 * KiB) == ci.path.read_bytes(), name
        finally:
            await src.aclose()


async def test_inspect(world):
    from erofs_mount.sources.oci.resolve import inspect_oci, inspection_lines

    res = await inspect_oci(world.ref("team/multi:v1"), options=INSECURE, platform="linux/arm64")
    lines = inspection_lines(res)
    assert lines[0] == f"reference: {world.ref('team/multi:v1')}@{world.manifests['team/multi:v1']}"
    assert "platforms: linux/amd64, linux/arm64/v8, linux/amd64" in lines
    assert "platform: linux/arm64/v8" in lines
    assert lines[-1] == f"layer 0: {world.digests['Z']} {len(world.blobs['Z'])} application/vnd.erofs erofs"
    res = await inspect_oci(world.ref("team/app:v1"), options=INSECURE)
    assert res.index is None and res.manifest_digest == res.top_digest == world.manifests["team/app:v1"]
    assert [l.split()[-1] for l in inspection_lines(res) if l.startswith("layer")] == ["erofs", "tar+gzip", "erofs"]


async def test_persistent_cache_shared_and_verified(world, tmp_path):
    opts = OciOptions(insecure=True, chunk_size=256 * KiB, cache=str(tmp_path / "cache"), cache_limit=64 * MiB)
    big = world.blobs["big"]
    src = await open_oci_source(world.ref("team/big:v1"), options=opts)
    try:
        assert await read_all(src, 200 * KiB) == big
    finally:
        await src.aclose()  # lets queued cache writes finish
    s = src.stats()
    assert s["disk_bytes_written"] == len(big) and s["disk_errors"] == 0
    entry = tmp_path / "cache" / "sha256" / world.digests["big"][7:]
    assert (entry / "data").read_bytes() == big
    # a second mount of the same digest reads everything from disk: no blob bytes over the network
    src = await open_oci_source(world.ref("team/big:v1"), options=opts)
    try:
        assert src.disk is not None and src.disk.verified
        assert await read_all(src, 300 * KiB) == big
        s = src.stats()
        assert s["bytes_fetched"] == 0 and s["disk_hits"] > 0
    finally:
        await src.aclose()
    # a blob larger than cache_limit is not cached on disk, and reads still work
    small_limit = OciOptions(insecure=True, cache=str(tmp_path / "c2"), cache_limit=MiB)
    src = await open_oci_source(world.ref("team/big:v1"), options=small_limit)
    try:
        assert src.disk is None and await src.read_at(5 * MiB, 10) == big[5 * MiB:5 * MiB + 10]
    finally:
        await src.aclose()


async def test_sync_reads_of_what_the_disk_cache_holds_skip_the_loop(world, tmp_path):
    """A warm mount's sync reader (the FUSE worker threads) reads what the persistent cache holds with
    one pread in its own thread; the rest still goes through the trio loop and the registry."""
    opts = OciOptions(insecure=True, chunk_size=256 * KiB, cache=str(tmp_path / "cache"), cache_limit=64 * MiB)
    big = world.blobs["big"]
    src = await open_oci_source(world.ref("team/big:v1"), options=opts)
    try:
        assert await src.read_at(0, MiB) == big[:MiB]
        await trio.sleep(0.2)      # the cache writes are background tasks
        bridge = SyncReadAt.here(src)
        offsets = (0, 5000, MiB - 4096, 7 * MiB + 10)
        on_disk = [src.disk.has(o, o + 4096) for o in offsets]
        assert on_disk[:3] == [True] * 3
        got = await trio.to_thread.run_sync(lambda: [bridge.read_at(o, 4096) for o in offsets])
        assert got == [big[o:o + 4096] for o in offsets]
        assert src.stats()["direct_reads"] == sum(on_disk)
    finally:
        await src.aclose()
    assert src.pread_cached(0, 10) is None       # closed: never a stale fd


async def test_many_readers_tiny_cache(world):
    """Concurrent readers, read-ahead and a cache smaller than what is in flight: every byte right."""
    opts = OciOptions(insecure=True, chunk_size=16 * KiB, memory_limit=64 * KiB, readahead=256 * KiB,
                      max_request=128 * KiB, connections=3)
    big = world.blobs["big"]
    rng = random.Random(11)
    plan = [[(rng.randrange(src_off, src_off + MiB), rng.randrange(1, 40 * KiB)) for _ in range(25)]
            for src_off in range(0, 8 * MiB, MiB)]
    src = await open_oci_source(world.ref("team/big:v1"), options=opts)
    try:
        async def reader(reads, sequential):
            if sequential:
                start = reads[0][0]
                for off in range(start, min(start + 600 * KiB, src.size), 24 * KiB):
                    assert await src.read_at(off, 24 * KiB) == big[off:off + 24 * KiB]
            for off, n in reads:
                assert await src.read_at(off, n) == big[off:off + n]

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for k, reads in enumerate(plan):
                    nursery.start_soon(reader, reads, k % 2 == 0)
        s = src.stats()
        assert s["cache_evictions"] > 0 and s["prefetched_chunks"] > 0 and s["cache_bytes"] <= 64 * KiB
    finally:
        await src.aclose()



async def test_read_memory_answers_only_what_the_memory_cache_holds(world):
    """The FUSE daemon's inline path (read_cached): bytes only when every chunk is in memory, nothing
    recorded otherwise; a hit is a read like read_at (counted, seen by the read-ahead)."""
    src = await open_oci_source(world.ref("team/app:v1"), options=INSECURE, layer=0)
    try:
        blob, cs = world.blobs["A"], src.chunk_size
        at = src.size // 2 // cs * cs + 5       # far from what the open read (the superblock)
        assert src.read_memory(at, 100) is None and src.read_cached(at, 100) is None
        st = src.stats()
        assert await src.read_at(at, 100) == blob[at:at + 100]
        after = src.stats()
        assert after["reads"] == st["reads"] + 1 and after["cache_misses"] == st["cache_misses"] + 1
        assert src.read_memory(at, 100) == blob[at:at + 100] and src.read_cached(at - 5, cs) == blob[at - 5:at - 5 + cs]
        assert src.stats()["reads"] == after["reads"] + 2 and src.stats()["cache_misses"] == after["cache_misses"]
        assert src.read_memory(at - 10, 20) in (None, blob[at - 10:at + 10])   # the chunk before: maybe not there
        assert src.read_memory(src.size + 10, 5) == b""
    finally:
        await src.aclose()
    assert src.read_memory(at, 100) is None                # closed
