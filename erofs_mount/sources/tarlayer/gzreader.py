"""Random reads of the uncompressed tar inside a tar+gzip blob, through its gzip checkpoints.

The uncompressed stream is cut into spans, one per checkpoint (``gzindex``: a bit offset in the
blob and the 32 KiB of output before it, zlib's zran technique).  A read decodes the spans it
touches, each once: the span's compressed bytes are fetched from the blob (one ranged read, as
``RangeInflater.want`` asks), inflated from the checkpoint in a worker thread (zlib through
ctypes releases the GIL), and kept in a byte-bounded LRU.  Concurrent readers of one span share
its decode (the in-flight table is updated before the first await, as in ``zstdsource``).
A reader going through the spans in order gets the next span decoded ahead, in a background task
whose inflate runs in a worker thread: the second core works while the first serves the reader.
"""

from __future__ import annotations

import trio

from ...errors import CorruptedError, ErofsMountError, SourceError
from ...gzindex import GzIndex, RangeInflater
from ..cache import ChunkCache, clamp

MIN_CACHE = 16 << 20
THREAD_MIN = 256 << 10    # compressed input above this is inflated in a worker thread


class _Decode:
    def __init__(self) -> None:
        self.event = trio.Event()
        self.data: bytes | None = None
        self.error: BaseException | None = None


class GzTarReader:
    def __init__(self, inner, index: GzIndex, *, what: str, cache_bytes: int = 64 << 20) -> None:
        if index.uncompressed_size is None:
            raise ValueError("the gzip index must know the uncompressed size")
        self._inner = inner
        self.index = index
        self.what = what
        self.size = index.uncompressed_size
        self.starts = [cp.out_offset for cp in index.checkpoints] + [self.size]
        self.spans = ChunkCache(max(MIN_CACHE, cache_bytes))
        self._inflight: dict[int, _Decode] = {}
        self._last = -2                  # the span the previous read ended in: a sequential reader's trail
        self._prefetch: trio.CancelScope | None = None
        self._closed = False
        self._n = {"gz_reads": 0, "spans_decoded": 0, "gz_bytes_in": 0, "gz_bytes_out": 0, "spans_coalesced": 0,
                   "spans_prefetched": 0}

    def _span_range(self, i: int) -> tuple[int, int]:
        return self.starts[i], self.starts[i + 1]

    def _spans_for(self, offset: int, length: int) -> range:
        first = self.index.position(offset)
        last = self.index.position(offset + length - 1)
        return range(first, last + 1)

    async def read_at(self, offset: int, length: int) -> bytes:
        offset, length = clamp(offset, length, self.size)
        if length == 0:
            return b""
        self._n["gz_reads"] += 1
        wanted = self._spans_for(offset, length)
        if wanted[0] in (self._last, self._last + 1):
            self._ahead(wanted[-1] + 1)
        self._last = wanted[-1]
        spans = []
        for i in wanted:
            data = self.spans.get(i)
            spans.append((i, data if data is not None else await self._span(i)))
        return self._cut(offset, length, spans)

    def _cut(self, offset: int, length: int, spans: list[tuple[int, bytes]]) -> bytes:
        """``[offset, offset+length)`` out of the decoded spans that cover it (one copy)."""
        parts = []
        for i, data in spans:
            lo, hi = self._span_range(i)
            parts.append(memoryview(data)[max(offset, lo) - lo:min(offset + length, hi) - lo])
        return bytes(parts[0]) if len(parts) == 1 else b"".join(parts)

    def _ahead(self, i: int) -> None:
        """Decode span ``i`` in the background unless it is there, under way, or one is already."""
        if (self._closed or i >= len(self.starts) - 1 or self._prefetch is not None or i in self._inflight
                or self.spans.peek(i) is not None):
            return
        try:
            trio.lowlevel.spawn_system_task(self._prefetch_span, i, name=f"gz span {i} ahead")
        except RuntimeError:        # no trio run (a sync caller): nothing ahead
            pass

    async def _prefetch_span(self, i: int) -> None:
        with trio.CancelScope() as scope:
            self._prefetch = scope
            try:
                if self.spans.peek(i) is not None or i in self._inflight:
                    return                  # a read got there first
                self._n["spans_prefetched"] += 1
                await self._span(i)
            except Exception:  # noqa: BLE001 - a failed read-ahead is retried, and reported, by the read itself
                pass
            finally:
                self._prefetch = None

    def read_cached(self, offset: int, length: int) -> bytes | None:
        """The bytes if every span they need is decoded and cached, else None (no I/O, no decode)."""
        offset, length = clamp(offset, length, self.size)
        if length == 0:
            return b""
        spans = []
        for i in self._spans_for(offset, length):
            data = self.spans.peek(i)
            if data is None:
                return None
            spans.append((i, data))
        return self._cut(offset, length, spans)

    async def _span(self, i: int) -> bytes:
        f = self._inflight.get(i)
        if f is not None:
            self._n["spans_coalesced"] += 1
            await f.event.wait()
            if f.data is None:
                if not isinstance(f.error, Exception):   # its owner was cancelled: decode it here
                    return await self._span(i)
                raise _as_error(f.error, self, i)
            return f.data
        f = self._inflight[i] = _Decode()   # before the first await: later readers wait for this one
        try:
            f.data = await self._decode(i)
            self.spans.put(i, f.data)
            return f.data
        except Exception as exc:
            f.error = exc
            raise _as_error(exc, self, i) from None
        except BaseException as exc:
            f.error = exc
            raise
        finally:
            del self._inflight[i]
            f.event.set()

    async def _decode(self, i: int) -> bytes:
        lo, hi = self._span_range(i)
        r = RangeInflater(self.index, lo, hi - lo)
        parts = []
        try:
            while (want := r.want()) is not None:
                raw = await self._inner.read_at(*want)
                self._n["gz_bytes_in"] += len(raw)
                if len(raw) > THREAD_MIN:
                    parts.append(await trio.to_thread.run_sync(r.feed, raw))
                else:
                    parts.append(r.feed(raw))
        finally:
            r.close()
        data = b"".join(parts)
        if len(data) != hi - lo:
            raise CorruptedError(f"the gzip stream ends at uncompressed offset {lo + len(data)}, "
                                 f"inside span {i} ({lo}..{hi})")
        self._n["spans_decoded"] += 1
        self._n["gz_bytes_out"] += len(data)
        return data

    def stats(self) -> dict:
        st = dict(self._inner.stats()) if hasattr(self._inner, "stats") else {}
        st.update(self._n)
        st.update({"gz_checkpoints": len(self.index.checkpoints), "span_cache_bytes": self.spans.used,
                   "span_cache_hits": self.spans.hits, "span_cache_misses": self.spans.misses})
        return st

    async def aclose(self) -> None:
        """Stop the read-ahead; the blob source is closed by its owner (``TarLayerSource``)."""
        self._closed = True
        if self._prefetch is not None:
            self._prefetch.cancel()


def _as_error(exc: Exception | None, r: GzTarReader, i: int) -> Exception:
    lo, hi = r._span_range(i)
    if isinstance(exc, CorruptedError):
        return CorruptedError(f"{r.what}: gzip data of tar bytes {lo}..{hi}: {exc}")
    if isinstance(exc, ErofsMountError):
        return exc
    return SourceError(f"{r.what}: reading gzip span {i} failed: {exc!r}")
