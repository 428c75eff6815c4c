"""ZstdSeekableSource: random access to a ``+zstd`` EROFS layer in the zstd seekable format.

Wraps the ``OciBlobSource`` of the compressed blob.  The seek table (``zseek.py``) maps a
decompressed range to frames; a frame's compressed bytes come from the inner source's
``read_at`` (so its chunk cache, read-ahead streams, retries and persistent cache apply),
are decoded (in a worker thread above ``THREAD_MIN`` bytes) and kept in a byte-bounded
LRU of decoded frames.  A frame being decoded is registered in ``_inflight`` before the
first await: concurrent readers of it wait for the same decode.  A frame that fails to
decode or to match its checksum fails (EIO) the reads touching it, and only those.

Attributes the rest of the code reads from an OciBlobSource (digest, media_type, ref,
platform, layer_index, manifest_digest, options, client, credentials_origin, …) are
forwarded to the inner source; ``size`` is the decompressed size.
"""

from __future__ import annotations

import errno
import logging

import trio

from ...errors import CorruptedError, ErofsMountError, SourceError, UnsupportedError
from ..cache import ChunkCache, clamp
from . import zseek

log = logging.getLogger("erofs_mount.sources.oci")
THREAD_MIN = 256 << 10          # decode frames larger than this in a worker thread
THREAD_MIN_CHECKSUM = 16 << 10  # ... or than this when the (pure Python) XXH64 must run
MIN_CACHE = 4 << 20


class _OwnerGone(Exception):
    """The reader decoding a frame was cancelled before it finished: its waiters retry."""


class _Decode:
    __slots__ = ("data", "error", "event")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.data: bytes | None = None
        self.error: BaseException | None = None


class ZstdSeekableSource:
    def __init__(self, inner, table: zseek.SeekTable) -> None:
        self._inner = inner
        self.table = table
        self.size = table.size
        self.frame_cache = ChunkCache(max(MIN_CACHE, inner.options.memory_limit // 4))
        self._inflight: dict[int, _Decode] = {}
        self._closed = False
        self._n = {"zstd_reads": 0, "frames_decoded": 0, "bytes_decompressed": 0, "frame_errors": 0,
                   "frames_coalesced": 0}

    def __getattr__(self, name: str):
        if name.startswith("__") or name == "_inner":
            raise AttributeError(name)
        return getattr(self._inner, name)

    @property
    def inner(self):
        """The OciBlobSource of the compressed blob."""
        return self._inner

    @property
    def compressed_size(self) -> int:
        return self._inner.size

    def __repr__(self) -> str:
        return f"ZstdSeekableSource({self._inner!r}, frames={self.table.nframes}, size={self.size})"

    # -- public -------------------------------------------------------------------------
    async def read_at(self, offset: int, length: int) -> bytes:
        if self._closed:
            raise SourceError(f"{self._inner.ref}: source is closed")
        offset, length = clamp(offset, length, self.size)
        if length == 0:
            return b""
        self._n["zstd_reads"] += 1
        wanted = self.table.frames_for(offset, length)
        have: dict[int, bytes] = {}
        for i in wanted:
            data = self.frame_cache.get(i)
            if data is not None:
                have[i] = data
        missing = [i for i in wanted if i not in have]
        if missing:
            have.update(await self._get(missing))
        d = self.table.d_offsets
        out = bytearray()
        for i in wanted:
            lo = max(offset, d[i]) - d[i]
            hi = min(offset + length, d[i + 1]) - d[i]
            out += memoryview(have[i])[lo:hi]
        return bytes(out)

    def stats(self) -> dict:
        st = dict(self._inner.stats())
        st.update(self._n)
        st.update({"size": self.size, "compressed_size": self._inner.size, "frames": self.table.nframes,
                   "frame_cache_bytes": self.frame_cache.used, "frame_cache_hits": self.frame_cache.hits,
                   "frame_cache_misses": self.frame_cache.misses})
        return st

    async def aclose(self) -> None:
        self._closed = True
        await self._inner.aclose()

    # -- decoding -------------------------------------------------------------------------
    async def _get(self, missing: list[int]) -> dict[int, bytes]:
        inflight = self._inflight
        mine = [i for i in missing if i not in inflight]
        self._n["frames_coalesced"] += len(missing) - len(mine)
        for i in mine:   # registered before the first await: concurrent readers share the decode
            inflight[i] = _Decode()
        decodes = {i: inflight[i] for i in missing}
        if mine:
            try:
                async with trio.open_nursery() as nursery:
                    for run in _runs(mine):
                        nursery.start_soon(self._fetch_run, run, decodes)
            finally:
                for i in mine:   # never leave a waiter hanging (cancelled, or failed before delivery)
                    self._settle(i, decodes[i], _OwnerGone())
        out: dict[int, bytes] = {}
        for i in missing:
            f = decodes[i]
            await f.event.wait()
            if f.data is None and i not in mine and isinstance(f.error, _OwnerGone):
                return {**out, **await self._get([j for j in missing if j not in out])}  # owner cancelled: retry
            if f.data is None:
                raise _as_error(f.error, self, i)
            out[i] = f.data
        return out

    async def _fetch_run(self, run: list[int], decodes: dict) -> None:
        """Consecutive frames *run*: one read of their compressed bytes, then each decoded."""
        t = self.table
        c0 = t.c_offsets[run[0]]
        c1 = t.c_offsets[run[-1] + 1]
        try:
            raw = await self._inner.read_at(c0, c1 - c0)
            if len(raw) != c1 - c0:
                raise SourceError(f"{self._inner.ref}: short read of frames {run[0]}..{run[-1]}")
        except Exception as exc:  # noqa: BLE001 -- any failure goes to the waiters of these frames
            for i in run:
                self._settle(i, decodes[i], exc)
            return
        for i in run:
            coff, csize, _, dsize = t.frame(i)
            piece = raw[coff - c0:coff - c0 + csize]
            checksum = t.checksums[i] if t.checksums is not None else None
            try:
                threshold = THREAD_MIN_CHECKSUM if checksum is not None else THREAD_MIN
                if dsize > threshold:
                    data = await trio.to_thread.run_sync(zseek.decode_frame, piece, dsize, checksum)
                else:
                    data = zseek.decode_frame(piece, dsize, checksum)
            except CorruptedError as exc:
                self._n["frame_errors"] += 1
                self._settle(i, decodes[i], exc)
                continue
            self._n["frames_decoded"] += 1
            self._n["bytes_decompressed"] += len(data)
            self.frame_cache.put(i, data)
            self._settle(i, decodes[i], None, data)

    def _settle(self, i: int, f: _Decode, error: BaseException | None, data: bytes | None = None) -> None:
        if f.event.is_set():
            return
        f.data, f.error = data, error
        if self._inflight.get(i) is f:
            del self._inflight[i]
        f.event.set()


def _runs(frames: list[int]) -> list[list[int]]:
    """Sorted frame indexes → runs of consecutive ones (each run one inner read)."""
    out: list[list[int]] = []
    for i in frames:
        if out and out[-1][-1] + 1 == i:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def _as_error(exc: BaseException | None, src: ZstdSeekableSource, i: int) -> ErofsMountError:
    if isinstance(exc, CorruptedError):
        _, _, doff, dsize = src.table.frame(i)
        return CorruptedError(f"{src._inner.ref} layer {src._inner.digest}: zstd frame {i} "
                              f"(bytes {doff}..{doff + dsize}): {exc}", errno=errno.EIO)
    if isinstance(exc, ErofsMountError):
        return exc
    return SourceError(f"{src._inner.ref}: reading zstd frame {i} failed: {exc!r}")


def is_zstd_layer(media_type: str) -> bool:
    return media_type.partition("+")[2] == "zstd"


async def open_zstd_layer(inner, what: str) -> ZstdSeekableSource:
    """Read the seek table at the end of *inner* (footer first, then the table) and wrap it.

    A blob without a seek table is refused with one line naming the layer (*what*)."""
    try:
        size = inner.size
        footer = await inner.read_at(max(0, size - zseek.FOOTER_SIZE), zseek.FOOTER_SIZE)
        tsize = zseek.table_size(footer, size)
        table = zseek.parse_seek_table(await inner.read_at(size - tsize, tsize), size)
    except zseek.NoSeekTable as exc:
        raise UnsupportedError(
            f"{what} is a zstd-compressed EROFS layer ({inner.media_type}) without a zstd seek table"
            f" (seekable format chunk index): {exc}; random access needs one: push the uncompressed image"
            " or a zstd seekable-format blob") from None
    except (CorruptedError, UnsupportedError) as exc:
        raise type(exc)(f"{what} ({inner.media_type}): {exc}", errno=exc.errno) from None
    return ZstdSeekableSource(inner, table)
