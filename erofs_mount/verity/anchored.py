"""A registry blob checked block by block against the tree its indexing pass built from it.

    src = await open_anchored(blob, root, area, name="REF layer 0 (sha256:…)")

``root`` and ``area`` come from ``blobtree.BlobTree`` (made while the whole blob streamed past
the tar indexing pass, whose bytes matched the layer's digest; kept in the layer's cache entry
next to the index).  The blob is presented to a ``VeritySource`` as a device holding it, zeros up
to 4 KiB, and the tree (``WithTree``): the same checks, refetch-once-then-EIO, cache gate and
persistent-cache marks as a tree appended to an EROFS image, with the tree read from memory.  The
trust is the digest's: the tree says only that a later read gives the bytes the digest covered.
"""

from __future__ import annotations

import logging

import trio

from ..sources.cache import clamp
from .blobtree import BLOCK, hash_offset_for
from .source import _FORWARDED, VeritySource, open_verified

log = logging.getLogger("erofs_mount.verity")


class WithTree:
    """*blob*'s bytes, zeros from its end to *hash_offset*, then *area* (the tree, in memory)."""

    def __init__(self, blob, area: bytes, hash_offset: int) -> None:
        if hash_offset < blob.size or hash_offset - blob.size >= BLOCK:
            raise ValueError(f"a tree at {hash_offset} does not follow a blob of {blob.size} bytes")
        self.blob = blob
        self.area = area
        self.hash_offset = hash_offset
        self.size = hash_offset + len(area)

    def __getattr__(self, name: str):
        if name in _FORWARDED:
            return getattr(self.__dict__["blob"], name)
        raise AttributeError(name)

    def __repr__(self) -> str:
        return f"WithTree({self.blob!r}, tree={len(self.area)} bytes)"

    async def read_at(self, offset: int, length: int) -> bytes:
        return (await self.read_trusted(offset, length))[0]

    async def read_trusted(self, offset: int, length: int) -> tuple[bytes, bool]:
        """(the bytes, whether the blob's cache gate passed all of them): ``VeritySource`` reads
        whole data blocks through this, the last one running past the blob into its zero padding."""
        blob = self.blob
        offset, length = clamp(offset, length, self.size)
        end = offset + length
        if end <= blob.size:    # every read but the blob's last block, and the tree's
            return await _trusted(blob, offset, length)
        data, trusted = b"", True
        if offset < blob.size:
            data, trusted = await _trusted(blob, offset, blob.size - offset)
            if len(data) != blob.size - offset:
                return data, False   # short: the caller says so
        return data + self._past_blob(offset, end), trusted

    def _past_blob(self, offset: int, end: int) -> bytes:
        """The bytes of [offset, end) at or after the blob's end: zeros up to the tree, the tree."""
        pos = max(offset, self.blob.size)
        zeros = bytes(max(0, min(end, self.hash_offset) - pos))
        return zeros + self.area[max(0, pos - self.hash_offset):max(0, end - self.hash_offset)]

    @property
    def accept(self):
        """The blob's cache gate (``padded_gate`` of the VeritySource over this), or None."""
        return getattr(self.blob, "accept", None)

    def read_memory(self, offset: int, length: int) -> bytes | None:
        """The blob's ``read_memory`` (its memory cache, sync), the zero padding after it added;
        None when the blob has none or lacks a chunk."""
        read = getattr(self.blob, "read_memory", None)
        if read is None or offset + length > self.hash_offset:
            return None
        size, end = self.blob.size, offset + length
        if end <= size:
            return read(offset, length)
        data = read(offset, size - offset) if offset < size else b""
        return None if data is None else data + self._past_blob(offset, end)

    def forget(self, offset: int, length: int) -> None:
        """A block that did not verify: the blob's caches drop it (and a mirror that served it is
        not asked for this blob again)."""
        blob = self.blob
        if offset < blob.size and hasattr(blob, "forget"):
            blob.forget(offset, min(length, blob.size - offset))

    def stats(self) -> dict:
        return dict(self.blob.stats()) if hasattr(self.blob, "stats") else {}

    async def aclose(self) -> None:
        """The blob is closed by its owner (the tar layer source)."""


async def _trusted(blob, offset: int, length: int) -> tuple[bytes, bool]:
    read = getattr(blob, "read_trusted", None)
    if read is not None:
        return await read(offset, length)
    return await blob.read_at(offset, length), False


def padded_gate(accept, size: int):
    """*accept* (``VeritySource.accept``: whole blocks only) for the blob's chunks, the last of
    which ends with the blob, inside a block: checked with the zeros that pad it."""
    tail = size % BLOCK
    if not tail:
        return accept

    def gate(offset: int, data) -> bool:
        if offset + len(data) == size:
            data = bytes(data) + bytes(BLOCK - tail)
        return accept(offset, data)
    return gate


async def open_anchored(blob, root: bytes, area: bytes, *, name: str) -> VeritySource:
    """A VeritySource over *blob* with the tree made by its indexing pass; the blob's cache gate
    installed (only verified chunks are cached) and its persistent cache's verified marks in use."""
    hash_offset = hash_offset_for(blob.size)
    src = await open_verified(WithTree(blob, area, hash_offset), root, hash_offset=hash_offset, name=name,
                              probe=False)
    if hasattr(blob, "set_gate"):
        blob.set_gate(padded_gate(src.accept, blob.size))
    disk = getattr(blob, "disk", None)
    if disk is not None:
        try:
            await trio.to_thread.run_sync(_use_marks, disk, root, blob.size)
        except OSError as exc:
            log.warning("%s: persistent cache %s: verified marks unusable (%s)", name, disk.path, exc)
    return src


def _use_marks(disk, root: bytes, size: int) -> None:
    """The entry's marks for this tree; an entry already complete and checked against the digest
    (the indexing pass filled it) is marked whole: its bytes are the ones the tree was made from."""
    disk.use_marks(root.hex())
    if disk.complete and disk.verified and not disk.marked(0, size):
        disk.mark(0, size)
