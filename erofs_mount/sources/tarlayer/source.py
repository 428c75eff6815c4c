"""A tar layer served as an EROFS image: the tar index followed by the uncompressed tar.

``TarLayerSource(index, tar, inner=…)`` is a source (``size``, ``read_at``, ``aclose``,
``stats``) whose bytes are ``index + tar``: exactly the device erofs-utils' mount.erofs builds
for ``oci.tarindex=`` (mount/main.c erofsmount_tarindex_pread), so the pure reader (FUSE, the
tools) and the kernel (NBD) read it like any image.  ``tar`` is any source of the uncompressed
tar stream: the blob itself (plain tar), a gzip span reader (``gzreader.py``), a zstd seekable
source, or the decompressed stream kept on disk (one-frame zstd).  Attributes it does not have
(``digest``, ``ref``, ``platform``, … of a registry blob: ``DELEGATED``) come from ``inner``.
"""

from __future__ import annotations

from typing import Any

from ...errors import SourceError


class TarLayerSource:
    def __init__(self, index: bytes, tar: Any, *, kind: str, what: str, inner: Any = None,
                 closers: tuple = ()) -> None:
        self.index = index
        self.tar = tar
        self.kind = kind
        self.what = what
        self.index_size = len(index)
        self.size = self.index_size + tar.size
        self._inner = inner
        self._closers = closers
        self._closed = False
        self._n = {"index_reads": 0, "tar_reads": 0}

    # what callers may ask of the blob itself (never fileno/pread: its bytes are not this image's)
    DELEGATED = frozenset({"digest", "ref", "platform", "media_type", "layer_index", "manifest_digest",
                           "options", "path"})

    def __getattr__(self, name: str):
        inner = self.__dict__.get("_inner")
        if name not in self.DELEGATED or inner is None:
            raise AttributeError(name)
        return getattr(inner, name)

    def __repr__(self) -> str:
        return f"TarLayerSource({self.what}, {self.kind}, index={self.index_size}, tar={self.tar.size})"

    async def read_at(self, offset: int, length: int) -> bytes:
        if self._closed:
            raise SourceError(f"{self.what}: source is closed")
        end = min(offset + max(0, length), self.size)
        if offset >= end:
            return b""
        isz = self.index_size
        if end <= isz:
            self._n["index_reads"] += 1
            return self.index[offset:end]
        self._n["tar_reads"] += 1
        if offset >= isz:
            return await self.tar.read_at(offset - isz, end - offset)
        head = self.index[offset:isz]
        return head + await self.tar.read_at(0, end - isz)

    def read_cached(self, offset: int, length: int) -> bytes | None:
        """The bytes if they are in memory now (the index; the tar's resident parts), else None.
        Sync and without I/O: for callers on the trio thread that must not wait."""
        end = min(offset + max(0, length), self.size)
        if offset >= end or self._closed:
            return b""
        isz = self.index_size
        if end <= isz:
            return self.index[offset:end]
        cached = getattr(self.tar, "read_cached", None)
        if cached is None:
            return None
        tail = cached(max(offset, isz) - isz, end - max(offset, isz))
        if tail is None:
            return None
        return (self.index[offset:isz] + tail) if offset < isz else tail

    def stats(self) -> dict:
        st = dict(self.tar.stats()) if hasattr(self.tar, "stats") else {}
        if self._inner is not None and self._inner is not self.tar and hasattr(self._inner, "stats"):
            for k, v in self._inner.stats().items():
                st.setdefault(k, v)
        st.update(self._n)
        st.update({"layer_kind": self.kind, "tar_index_bytes": self.index_size, "tar_bytes": self.tar.size,
                   "size": self.size})
        if self._inner is not None:
            st["compressed_size"] = self._inner.size
        return st

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        for close in (self.tar.aclose, *self._closers):
            res = close()
            if hasattr(res, "__await__"):
                await res
        if self._inner is not None and self._inner is not self.tar and not getattr(self.tar, "owns_inner", False):
            await self._inner.aclose()
