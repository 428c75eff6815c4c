"""``+zstd`` EROFS layers in the zstd seekable format, served by a REAL docker-registry.

The seekable blobs are built here from real corpus images with ``zstandard`` (64 KiB frames) by a
small independent writer; the seek-table checksums come from libzstd itself (the content checksum
it writes at the end of a frame), not from the code under test."""

from __future__ import annotations

import errno
import random
import struct

import pytest
import trio
import trio.testing
import zstandard

from erofs_mount.errors import CorruptedError, SourceError, UnsupportedError
from erofs_mount.sources.oci import zseek
from erofs_mount.sources.oci.blob import open_oci_source
from erofs_mount.sources.oci.options import OciOptions
from erofs_mount.sources.oci.zstdsource import ZstdSeekableSource
from tests import corpuslib
from tests.conftest import run_cli

INSECURE = OciOptions(insecure=True)
MT = "application/vnd.erofs.layer.v1+zstd"
PLAIN = "plain-inline-4k"
FRAME = 64 << 10


def frame_checksum(data: bytes) -> int:
    return int.from_bytes(zstandard.ZstdCompressor(write_checksum=True).compress(data)[-4:], "little")


def seekable(data: bytes, frame: int = FRAME, *, checksums: bool = False) -> tuple[bytes, list]:
    """(blob, [(compressed offset, compressed size, decompressed size)]) of a seekable-format blob."""
    cctx = zstandard.ZstdCompressor(level=3)
    out, entries, table = bytearray(), [], bytearray()
    for off in range(0, len(data), frame):
        piece = data[off:off + frame]
        f = cctx.compress(piece)
        entries.append((len(out), len(f), len(piece)))
        out += f
        table += struct.pack("<II", len(f), len(piece))
        if checksums:
            table += struct.pack("<I", frame_checksum(piece))
    table += struct.pack("<IBI", len(entries), 0x80 if checksums else 0, 0x8F92EAB1)
    return bytes(out) + struct.pack("<II", 0x184D2A5E, len(table)) + bytes(table), entries


def patch(blob: bytes, pos: int, value: bytes) -> bytes:
    b = bytearray(blob)
    b[pos:pos + len(value)] = value
    return bytes(b)


@pytest.fixture(scope="module")
def zworld(world):
    """Seekable +zstd layers pushed once: name -> (ref, uncompressed image bytes, frame entries)."""
    image = world.blobs["A"]            # the real plain-inline-4k corpus image
    plain_blob, entries = seekable(image)
    sum_blob, sum_entries = seekable(image, checksums=True)
    n = len(sum_entries)
    tstart = len(sum_blob) - (8 + 12 * n + 9)
    bad_frame = 5
    layers = {
        "plain": (plain_blob, image, entries),
        "sums": (sum_blob, image, sum_entries),
        "lz4": seekable(world.blobs["B"], 32 << 10)[0:1] + (world.blobs["B"], None),
        # a checksum that does not match frame 5's content
        "badsum": (patch(sum_blob, tstart + 8 + 12 * bad_frame + 8,
                         struct.pack("<I", frame_checksum(image[bad_frame * FRAME:(bad_frame + 1) * FRAME]) ^ 1)),
                   image, sum_entries),
        "onepiece": (zstandard.ZstdCompressor().compress(image), image, None),   # one frame, no seek table
        "badmagic": (patch(plain_blob, len(plain_blob) - 8 - 8 * len(entries) - 9, b"\0\0\0\0"), image, None),
        "badsizes": (patch(plain_blob, len(plain_blob) - 8 * len(entries) - 9,
                           struct.pack("<I", entries[0][1] + 3)), image, None),
        "reserved": (patch(plain_blob, len(plain_blob) - 5, b"\x20"), image, None),
    }
    out = {}
    for name, (blob, img, ents) in layers.items():
        world.pusher.image(f"zstd/{name}", "v1", [(MT, blob)])
        out[name] = (world.ref(f"zstd/{name}:v1"), img, ents)
    out["bad_frame"] = bad_frame
    return out


async def read_all(src, piece=300_000):
    out = bytearray()
    for off in range(0, src.size, piece):
        out += await src.read_at(off, piece)
    return bytes(out)


@pytest.mark.trio
@pytest.mark.parametrize("name", ["plain", "sums", "lz4"])
async def test_every_byte(zworld, name):
    ref, image, _ = zworld[name]
    src = await open_oci_source(ref, options=INSECURE)
    try:
        assert isinstance(src, ZstdSeekableSource)
        assert src.size == len(image) and src.media_type == MT and src.layer_index == 0
        assert src.digest.startswith("sha256:") and src.size > src.compressed_size
        assert await read_all(src) == image
        rng = random.Random(name)
        for _ in range(300):   # random ranges, many crossing frame edges
            off = rng.randrange(len(image))
            n = rng.choice([1, 7, 4096, FRAME - 1, FRAME, FRAME + 1, 3 * FRAME + 5, 1 << 20])
            if rng.random() < 0.3:   # start just before a frame edge
                off = max(0, (off // FRAME) * FRAME - rng.randrange(1, 9))
            assert await src.read_at(off, n) == image[off:off + n], (off, n)
        size = len(image)
        assert await src.read_at(size - 10, 100) == image[-10:]
        assert await src.read_at(size, 10) == b"" and await src.read_at(size + 12345, 1) == b""
        assert await src.read_at(5, 0) == b""
        st = src.stats()
        assert st["size"] == size and st["frames"] == -(-size // (FRAME if name != "lz4" else 32 << 10))
        assert st["frames_decoded"] >= st["frames"] and st["bytes_decompressed"] >= size
        assert st["bytes_fetched"] > 0   # the inner source's counters are there too
    finally:
        await src.aclose()


@pytest.mark.trio
async def test_concurrent_readers_share_decodes(zworld):
    ref, image, entries = zworld["sums"]
    src = await open_oci_source(ref, options=INSECURE)
    try:
        results = {}

        async def reader(k):
            rng = random.Random(k)
            for j in range(20):
                off = rng.randrange(len(image))
                n = rng.randrange(1, 3 * FRAME)
                results[k, j] = (off, n, await src.read_at(off, n))

        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                for k in range(12):
                    nursery.start_soon(reader, k)
        for off, n, data in results.values():
            assert data == image[off:off + n]
        # each frame decoded at most once: concurrent readers waited for the same decode, later ones hit the LRU
        assert src.stats()["frames_decoded"] <= len(entries)
    finally:
        await src.aclose()


@pytest.mark.trio
async def test_no_seek_table_refused(zworld, world):
    ref, _, _ = zworld["onepiece"]
    with pytest.raises(UnsupportedError, match="seek table") as ei:
        await open_oci_source(ref, options=INSECURE)
    msg = str(ei.value)
    assert "\n" not in msg and "layer 0" in msg and "sha256:" in msg and MT in msg
    # the EROFS image (using zstd inside) pushed as +zstd by the session world: not a seekable blob either
    with pytest.raises(UnsupportedError, match="seek table"):
        await open_oci_source(world.ref("team/zstd:v1"), options=INSECURE)


@pytest.mark.trio
@pytest.mark.parametrize("name, match", [("badmagic", "skippable frame magic"), ("badsizes", "add up"),
                                         ("reserved", "reserved")])
async def test_corrupted_seek_table(zworld, name, match):
    ref, _, _ = zworld[name]
    with trio.fail_after(60):
        with pytest.raises(CorruptedError, match=match) as ei:
            await open_oci_source(ref, options=INSECURE)
    assert "\n" not in str(ei.value) and "layer 0" in str(ei.value)


@pytest.mark.trio
async def test_checksum_mismatch_fails_that_frame_only(zworld):
    ref, image, _ = zworld["badsum"]
    bad = zworld["bad_frame"]
    src = await open_oci_source(ref, options=INSECURE)
    try:
        lo, hi = bad * FRAME, (bad + 1) * FRAME
        for _ in range(2):   # a failed frame is not cached as good: it fails again
            with pytest.raises(CorruptedError, match=f"frame {bad}") as ei:
                await src.read_at(lo + 100, 10)
            assert ei.value.errno == errno.EIO and "checksum" in str(ei.value)
        with pytest.raises(CorruptedError):
            await src.read_at(lo - 10, 20)   # crossing into it
        assert await src.read_at(lo - 10, 10) == image[lo - 10:lo]
        assert await src.read_at(hi, FRAME) == image[hi:hi + FRAME]
        assert await src.read_at(0, lo) == image[:lo]
        assert src.stats()["frame_errors"] >= 3
    finally:
        await src.aclose()


def oci(*extra: str) -> list[str]:
    return ["-o", ",".join(("oci.insecure", "oci.layer=0", *extra))]


def test_cli_ls_and_extract_match_uncompressed(zworld, tmp_path):
    ref, _, _ = zworld["sums"]
    manifest = corpuslib.load_manifest(corpuslib.image(PLAIN).manifest)
    r = run_cli("ls", *oci(), ref, "/special", timeout=120)
    assert r.returncode == 0, r.stderr
    assert sorted(r.stdout.decode().split()) == sorted(manifest["entries"]["/special"]["children"])
    r = run_cli("extract", *oci(), ref, str(tmp_path / "out"), timeout=300)
    assert r.returncode == 0, r.stderr
    bad = corpuslib.compare_tree(manifest, tmp_path / "out", dir_size=False, dir_nlink=False)
    assert not bad, bad[:10]


@pytest.mark.parametrize("name, message", [("onepiece", "seek table"), ("badsizes", "seek table"),
                                           ("reserved", "reserved")])
def test_cli_refusals_one_line(zworld, name, message):
    ref, _, _ = zworld[name]
    r = run_cli("ls", *oci(), ref, "/", timeout=120)
    err = r.stderr.decode()
    assert r.returncode != 0 and err.count("\n") == 1 and message in err and "Traceback" not in err, err



class GatedSource:
    """A fake inner source (in-memory blob) whose reads wait for a gate: the cancellation and
    failure paths of the decode coalescing made deterministic.  The registry tests above cover
    the real OciBlobSource."""

    def __init__(self, blob: bytes) -> None:
        self.blob, self.size, self.options = blob, len(blob), OciOptions()
        self.ref, self.digest, self.media_type = "test/gated", "sha256:" + "0" * 64, MT
        self.gate, self.reads, self.fail = trio.Event(), 0, None

    async def read_at(self, offset: int, length: int) -> bytes:
        self.reads += 1
        await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return self.blob[offset:offset + length]

    async def aclose(self) -> None:
        pass

    def stats(self) -> dict:
        return {"size": self.size}


def gated(image: bytes) -> tuple[ZstdSeekableSource, GatedSource]:
    blob, _ = seekable(image)
    n = zseek.table_size(blob[-9:], len(blob))
    inner = GatedSource(blob)
    return ZstdSeekableSource(inner, zseek.parse_seek_table(blob[-n:], len(blob))), inner


@pytest.mark.trio
async def test_cancelled_owner_leaves_no_waiter_hanging(world):
    image = world.blobs["A"]
    src, inner = gated(image)
    off, n = 10 * FRAME + 17, 4 * FRAME   # frames 10..14
    got = []

    async def second():
        got.append(await src.read_at(off, n))

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            first = trio.CancelScope()

            async def first_reader():
                with first:
                    await src.read_at(off, n)

            nursery.start_soon(first_reader)
            await trio.testing.wait_all_tasks_blocked()   # the first reader owns the 5 decodes, at the gate
            nursery.start_soon(second)
            await trio.testing.wait_all_tasks_blocked()   # the second waits for them
            assert src.stats()["frames_coalesced"] == 5 and inner.reads == 1
            first.cancel()
            await trio.testing.wait_all_tasks_blocked()   # the second took them over: its own read, at the gate
            assert inner.reads == 2 and not got
            inner.gate.set()
    assert got == [image[off:off + n]] and src.stats()["frames_decoded"] == 5


@pytest.mark.trio
async def test_failed_fetch_fails_every_waiter(world):
    src, inner = gated(world.blobs["A"])
    inner.fail = SourceError("test/gated: registry gone")
    errors = []

    async def reader(off):
        try:
            await src.read_at(off, 2 * FRAME)
        except SourceError as exc:
            errors.append(exc)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for off in (0, FRAME // 2, FRAME):
                nursery.start_soon(reader, off)
            await trio.testing.wait_all_tasks_blocked()
            inner.gate.set()
    assert len(errors) == 3 and all("registry gone" in str(e) for e in errors)
    assert not src._inflight   # nothing left registered: a later read tries again
    inner.fail = None
    assert await src.read_at(0, 10) == world.blobs["A"][:10]
