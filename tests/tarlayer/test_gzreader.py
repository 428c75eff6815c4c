"""gzreader: spans decoded once and shared, the next one decoded ahead of a sequential reader,
nothing ahead of a random one, and closing with a decode ahead under way."""

from __future__ import annotations

import trio

from erofs_mount.sources.tarlayer.openlayer import open_local_layer


def test_sequential_reads_get_the_next_span_ahead(layers, tmp_path):
    tar = layers.tar

    async def main():
        src = await open_local_layer(str(layers.path("gnutar.tar.gz")), "gzip", cache_root=str(tmp_path / "c"))
        try:
            isz, got, off = src.index_size, bytearray(), 0
            while off < len(tar):
                got += await src.read_at(isz + off, 131072)
                off += 131072
                await trio.sleep(0)
            assert bytes(got) == tar
            st = src.stats()
            assert st["spans_prefetched"] >= 1 and st["spans_decoded"] == st["gz_checkpoints"], st
        finally:
            await src.aclose()

    trio.run(main)


def test_backward_reads_decode_nothing_ahead_and_close_mid_prefetch(layers, tmp_path):
    tar = layers.tar

    async def main():
        src = await open_local_layer(str(layers.path("gnutar.tar.gz")), "gzip", cache_root=str(tmp_path / "c"))
        isz = src.index_size
        starts = src.tar.starts
        assert len(starts) >= 3, "the layer needs two spans at least"
        try:
            for i in reversed(range(len(starts) - 1)):   # never the span after the previous one
                off = starts[i] + 100
                assert await src.read_at(isz + off, 5000) == tar[off:off + 5000]
            await trio.sleep(0.2)                        # anything spawned would have run by now
            assert src.stats()["spans_prefetched"] == 0
        finally:
            await src.aclose()
        # two reads in order start a decode ahead; closing right then must not hang or raise
        src = await open_local_layer(str(layers.path("gnutar.tar.gz")), "gzip", cache_root=str(tmp_path / "c"))
        await src.read_at(isz, 4096)
        await src.read_at(isz + 4096, 4096)
        await src.aclose()
        await trio.sleep(0.2)

    trio.run(main)
