"""The one pass over a tar layer that makes its index (async edge; the work runs in worker threads).

The blob is read in order, ``CHUNK`` bytes at a time (the next read overlaps the work on the
current one); each chunk is hashed (a registry blob must match its digest), decompressed
(``gzindex.GzIndexBuilder`` records gzip checkpoints on the way; ``zstandard`` for zstd, whose
output is spilled to disk), and the uncompressed bytes go through the sans-I/O tar parser, whose
members build the tree.  The tree then becomes the EROFS tar index.  Memory: one chunk in flight
and its decompressed output (yielded in pieces, so a gzip bomb never materialises), the tree
(``tarindex.tree``: bounded per entry), the checkpoints' windows (32 KiB per ``span``).
With ``tree=True`` every 4 KiB block of the blob as stored is hashed too (``verity/blobtree.py``):
the dm-verity tree that checks the later lazy reads of the blob (32 bytes per block).
"""

from __future__ import annotations

import hashlib
import logging
import sys
import time
from dataclasses import dataclass

import trio

from ...errors import CorruptedError, ErofsMountError, leaf_error
from ...gzindex import GzIndex, GzIndexBuilder
from ...gzindex.zstd import ZstdStreamIndexer
from ...tarindex.tarparse import TarParser
from ...tarindex.tree import Tree
from ...tarindex.writer import build_index
from ...verity.blobtree import BlobTree

log = logging.getLogger("erofs_mount.sources.tarlayer")

CHUNK = 4 << 20
SPAN = 4 << 20            # uncompressed bytes between gzip checkpoints


@dataclass
class Built:
    index: bytes
    tar_size: int
    gz: GzIndex | None
    members: int
    warnings: list[str]
    seconds: float
    tree: tuple[bytes, bytes] | None = None   # (root hash, hash area) of the blob as stored


class Progress:
    """Bytes and rate of the first pass: a self-rewriting line on a terminal, else a log line
    every ``LOG_EVERY`` seconds."""

    LOG_EVERY = 10.0

    def __init__(self, what: str, total: int) -> None:
        self.what, self.total = what, total
        self.start = self.last = time.monotonic()
        self.tty = sys.stderr.isatty()

    def update(self, done: int, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self.last < (0.5 if self.tty else self.LOG_EVERY):
            return
        self.last = now
        rate = done / max(now - self.start, 1e-6) / 1e6
        pct = 100.0 * done / self.total if self.total else 100.0
        line = f"indexing {self.what}: {done / 1e6:.1f} of {self.total / 1e6:.1f} MB ({pct:.0f}%), {rate:.1f} MB/s"
        if self.tty:
            sys.stderr.write("\r" + line + ("\n" if final else ""))
            sys.stderr.flush()
        else:
            log.info("%s", line)


class _Pass:
    """The sync part, run chunk by chunk in a worker thread."""

    def __init__(self, kind: str, what: str, spill, digest: str | None, blob_tree: BlobTree | None = None) -> None:
        self.kind, self.what, self.spill = kind, what, spill
        self.blob_tree = blob_tree
        self.parser = TarParser()
        self.tree = Tree()
        self.members = 0
        self.tar_size = 0
        self.sha = hashlib.sha256() if digest else None
        self.digest = digest
        self.gz = GzIndexBuilder(SPAN) if kind == "gzip" else None
        self.zs = ZstdStreamIndexer() if kind == "zstd" else None

    def _tar(self, data) -> None:
        self.tar_size += len(data)
        if self.spill is not None:
            self.spill.write(data)
        self.parser.feed(data)
        for m in self.parser.events():
            self.tree.add(m)
            self.members += 1

    def feed(self, chunk: bytes) -> None:
        try:
            self._feed(chunk)
        except ErofsMountError as exc:
            raise self._named(exc) from None

    def _named(self, exc: ErofsMountError) -> ErofsMountError:
        """The same error, its message led by the layer's name (every error of the pass says which layer)."""
        text = str(exc)
        return exc if text.startswith(self.what) else type(exc)(f"{self.what}: {text}", errno=exc.errno)

    def _feed(self, chunk: bytes) -> None:
        if self.sha is not None:
            self.sha.update(chunk)
        if self.gz is not None:
            for out in self.gz.feed(chunk):
                self._tar(out)
        elif self.zs is not None:
            for out in self.zs.feed(chunk):     # bounded pieces: a zstd bomb never materialises
                self._tar(out)
        else:
            self._tar(chunk)

    def finish(self) -> tuple[GzIndex | None, bytes, tuple[bytes, bytes] | None]:
        try:
            return self._finish()
        except ErofsMountError as exc:
            raise self._named(exc) from None

    def _finish(self) -> tuple[GzIndex | None, bytes, tuple[bytes, bytes] | None]:
        gz = self.gz.finish() if self.gz is not None else None
        if self.zs is not None:
            self.zs.finish()                    # a stream that ends inside a frame is refused
        self.parser.close()
        for m in self.parser.events():
            self.tree.add(m)
            self.members += 1
        if self.sha is not None:
            got = "sha256:" + self.sha.hexdigest()
            if got != self.digest:
                raise CorruptedError(f"{self.what}: the blob's content has digest {got}, not {self.digest}")
        tree = self.blob_tree.finish() if self.blob_tree is not None else None   # after the digest matched
        return gz, build_index(self.tree, self.tar_size), tree


async def index_layer(blob, kind: str, *, what: str, digest: str | None = None, spill=None,
                      tree: bool = False) -> Built:
    """Read ``blob`` once (``read_at`` in order) and make the index of the tar it holds (*tree*:
    and the dm-verity tree of the blob itself)."""
    start = time.monotonic()
    work = _Pass(kind, what, spill, digest, BlobTree(blob.size) if tree else None)
    progress = Progress(what, blob.size)
    size = blob.size
    send, recv = trio.open_memory_channel(1)      # one chunk read ahead of the work

    async def reader() -> None:
        async with send:
            off = 0
            while off < size:
                data = await blob.read_at(off, min(CHUNK, size - off))
                if not data:
                    raise CorruptedError(f"{what}: the blob ends at offset {off} of {size}")
                await send.send(data)
                off += len(data)

    done = 0
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            async with recv:
                async for chunk in recv:      # an error here ends the nursery, and so the reader
                    if work.blob_tree is None:
                        await trio.to_thread.run_sync(work.feed, chunk)
                    else:   # the blob's tree hashed in a second thread (hashlib lets go of the GIL)
                        async with trio.open_nursery() as both:
                            both.start_soon(trio.to_thread.run_sync, work.blob_tree.feed, chunk)
                            await trio.to_thread.run_sync(work.feed, chunk)
                    done += len(chunk)
                    progress.update(done)
    except BaseExceptionGroup as group:
        raise leaf_error(group) from None
    gz, index, blob_tree = await trio.to_thread.run_sync(work.finish)
    progress.update(size, final=True)
    for w in work.tree.warnings:
        log.warning("%s: %s", what, w)
    secs = time.monotonic() - start
    log.info("%s: indexed %d members, %d bytes of tar, index %d bytes, in %.1f s", what, work.members,
             work.tar_size, len(index), secs)
    return Built(index, work.tar_size, gz, work.members, list(work.tree.warnings), secs, blob_tree)

