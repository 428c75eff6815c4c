"""PURE: frame boundaries of a tar+zstd layer, recorded while it streams through once.

zstd has no zran-style resume point inside a frame (the decoder state is more than a window), so the
only places a read can start are frame starts.  ``ZstdStreamIndexer`` decompresses the stream (the
caller parses the tar from the output, as with ``GzIndexBuilder``) and records, for every frame,
its compressed and uncompressed start; skippable frames (``0x184D2A5?``, e.g. a seek table) are
frames with no output.

Most zstd layers (containerd/buildkit ``tar+zstd``, the ``zstd`` CLI on a pipe) are ONE frame: then
the index is just (0, 0) and random access needs the decompressed stream kept -- the caller keeps it
in the persistent cache.  Layers written as many frames (zstd:chunked, the seekable format, which
``sources/oci/zseek.py`` reads from its own seek table) get one entry per frame.

python-zstandard's ``decompressobj().decompress`` has no output limit, so input is handed to it in
slices sized to keep each output near 1 MiB (starting at 256 bytes: a run-length block of 4 bytes
can stand for 128 KiB, so the first slice yields at most 8 MiB).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import zstandard

from ..errors import CorruptedError

_TARGET = 1 << 20
_MIN_SLICE, _MAX_SLICE = 64, 1 << 20


@dataclass(frozen=True, slots=True)
class ZstdFrame:
    in_offset: int           # compressed offset of the frame's magic number
    out_offset: int          # uncompressed offset of its first byte


class ZstdStreamIndexer:
    """``for chunk in ix.feed(compressed): parse(chunk)`` … ``frames = ix.finish()``; ``feed`` is lazy
    as ``GzIndexBuilder.feed`` is (input not consumed by a dropped iterator goes to the next one)."""

    def __init__(self, *, max_window_size: int = 1 << 27) -> None:
        self._dctx = zstandard.ZstdDecompressor(max_window_size=max_window_size)
        self._dobj = None
        self._pending = b""
        self._pos = 0                    # consumed part of _pending
        self._in = 0                     # compressed offset of _pending[_pos]
        self._out = 0
        self._slice = 256
        self._frames: list[ZstdFrame] = []
        self._gen = 0

    @property
    def uncompressed_size(self) -> int:
        return self._out

    def feed(self, compressed: bytes) -> Iterator[bytes]:
        self._pending = self._pending[self._pos:] + bytes(compressed)
        self._pos = 0
        self._gen += 1
        return self._drain(self._gen)

    def finish(self) -> tuple[ZstdFrame, ...]:
        self._gen += 1
        for _ in self._drain(self._gen):
            pass
        if self._dobj is not None or not self._frames:
            raise CorruptedError(f"truncated zstd at compressed offset {self._in}" if self._frames
                                 else "not a zstd stream: no data")
        return tuple(self._frames)

    def _drain(self, gen: int) -> Iterator[bytes]:
        while self._pos < len(self._pending) and self._gen == gen:
            if self._dobj is None:
                self._frames.append(ZstdFrame(self._in, self._out))
                self._dobj = self._dctx.decompressobj()
            piece = self._pending[self._pos:self._pos + self._slice]
            try:
                out = self._dobj.decompress(piece)
            except zstandard.ZstdError as exc:
                raise CorruptedError(f"zstd: {exc} (frame at compressed offset {self._frames[-1].in_offset})") \
                    from None
            used = len(piece)
            if self._dobj.eof:
                used -= len(self._dobj.unused_data)
                self._dobj = None
            self._pos += used
            self._in += used
            self._out += len(out)
            if len(out) > _TARGET:
                self._slice = max(_MIN_SLICE, self._slice * _TARGET // len(out))
            elif len(out) < _TARGET // 4:
                self._slice = min(_MAX_SLICE, self._slice * 2)
            if out:
                yield out


__all__ = ["ZstdFrame", "ZstdStreamIndexer"]
