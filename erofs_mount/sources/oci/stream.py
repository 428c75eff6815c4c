"""Sequential read-ahead for OciBlobSource: one long Range GET per sequential reader.

A reader detected as sequential (``cache.ReadAhead``) gets a ``BlobStream``:
ONE streaming Range GET from the first chunk it misses to the end of the blob
(or to the first chunk the persistent cache already holds).  Its body is cut
into chunks handed to the cache and to waiting readers as they arrive, so a
sequential reader pays one round trip, not one per window refill.

Backpressure: the stream may run ``lead`` chunks ahead of its reader (the
read-ahead window, capped at half the memory cache).  There it stops reading
the socket; TCP flow control then holds the server back, and the bytes
fetched past what the reader used stay bounded by the window.  Every
continuing read moves the limit on.

Drop-behind: a chunk the stream brought leaves the cache once its reader is
two chunks past it: a sequential reader does not come back (re-reads are
served by the kernel's page cache above us), and a long stream must neither
flush the chunks random readers need (metadata) nor make the cache grow
through fresh memory.

A stream ends at its Range's end, when ``aclose()`` cancels it, when it is the
least recently used one and another is needed (at most ``connections``), or
when its reader left it: paused for ``timeout`` seconds with no read moving it
on.  Failures are bounded like every GET (``client.fetch_range`` with
``pace``): a body broken mid-way resumes with a new Range GET from the first
missing byte; when the retries run out the chunks it owed fail and each reader
waiting for them falls back to its own bounded GET (or gets EIO if the chunk
was its own).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from ...errors import SourceError
from ..cache import chunk_extent

if TYPE_CHECKING:  # pragma: no cover
    from .blob import OciBlobSource

log = logging.getLogger("erofs_mount.sources.oci")


# the error of chunks a stream owed when it ended without failing (superseded, idle, closed):
# a reader waiting for one fetches it itself, whoever asked for it (compared by identity, never raised)
STOPPED = SourceError("read-ahead stream stopped")


class Fetch:
    """One chunk on its way: readers wait on ``event``; then ``data`` or ``error`` is set.
    ``owner`` is the BlobStream that will deliver it, None for an ordinary GET."""

    __slots__ = ("event", "data", "error", "owner")

    def __init__(self, owner: "BlobStream | None" = None) -> None:
        self.event = trio.Event()
        self.data: bytes | bytearray | memoryview | None = None
        self.error: BaseException | None = None
        self.owner = owner


class BlobStream:
    def __init__(self, src: "OciBlobSource", first: int, end: int) -> None:
        self.src = src
        self.first = first  # chunk the stream started at
        self.next = first  # next chunk to arrive
        self.end = end  # chunk index where it stops (moved back when another stream starts there)
        self.range_end = end  # chunk index past the Range asked for
        self.limit = first  # chunks below this may be fetched now; the stream pauses there
        self.behind = first  # chunks below this were dropped behind the reader
        self.scope = trio.CancelScope()
        self.active = True
        self._wake = trio.Event()

    def __repr__(self) -> str:
        return f"BlobStream(chunks {self.first}..{self.end}, next={self.next}, limit={self.limit})"

    def holds(self, chunk: int) -> bool:
        """Is *chunk* within what this stream was already let fetch (its reader continuing)?"""
        return self.active and self.behind <= chunk <= self.limit and chunk < self.end

    def follows(self, chunk: int, gap: int) -> bool:
        """Will this stream bring *chunk* soon (at most *gap* chunks from where it is)?"""
        return self.active and self.first <= chunk < self.end and 0 <= chunk - self.next < gap

    def drop_behind(self, chunk: int) -> int:
        """The reader is at *chunk*: what the stream brought more than one chunk before it leaves
        the cache (the reader does not come back: the kernel's page cache above serves re-reads;
        the one chunk of lag absorbs slightly reordered reads).  Returns the chunks dropped."""
        upto = min(chunk - 1, self.next)
        n = 0
        for i in range(self.behind, upto):
            n += self.src.cache.discard(i)
        self.behind = max(self.behind, upto)
        return n

    def truncate(self, chunk: int) -> None:
        """Another stream takes over from *chunk* (one this one has not reached): stop there."""
        self.end = min(self.end, chunk)
        if self.next >= self.end:
            self.stop()

    def advance(self, target: int) -> list[int]:
        """Let the stream run up to chunk *target* (exclusive); register (as Fetch objects owned
        by it) the chunks it will bring that nobody has or fetches; return them."""
        target = min(target, self.end)
        if target <= self.limit:
            return []
        src = self.src
        inflight, cache = src._inflight, src.cache
        mine = []
        for i in range(max(self.limit, self.next), target):
            if i not in inflight and i not in cache:
                inflight[i] = Fetch(self)
                mine.append(i)
        self.limit = target
        self._wake.set()
        return mine

    def stop(self) -> None:
        self.active = False
        self.scope.cancel()

    # -- the GET -----------------------------------------------------------------------
    async def run(self) -> None:
        """The stream's task body (a system task of the source).  Never raises."""
        src = self.src
        cs = src.chunk_size
        error: BaseException = STOPPED
        try:
            with self.scope:
                start, _ = chunk_extent(self.first, cs, src.size)
                _, end = chunk_extent(self.end - 1, cs, src.size)
                await src.client.fetch_range(src.digest, start, end, piece=cs, deliver=self._deliver,
                                             pace=self._pace)
        except Exception as exc:  # retries ran out: what it owed fails (readers decide what to do)
            error = exc
            log.debug("%r failed: %r", self, exc)
        except BaseException as exc:  # a system task must never raise
            log.debug("%r ended: %r", self, exc)
        finally:
            self.active = False
            src._stream_ended(self, error)

    def _deliver(self, offset: int, data: bytearray) -> None:
        i = offset // self.src.chunk_size
        self.next = i + 1
        self.src._chunk_arrived(i, data, self)

    async def _pace(self, offset: int) -> None:
        """Called after every chunk: wait while the stream is at its limit (backpressure)."""
        nxt = -(-offset // self.src.chunk_size)
        if nxt >= self.end:
            if self.end < self.range_end:  # truncated: drop the rest of the body
                self.stop()
                await trio.lowlevel.checkpoint()
            return
        if nxt < self.limit:
            return
        with trio.move_on_after(self.src.options.timeout):  # nobody moved it on: the reader left
            while nxt >= self.limit:
                self._wake = trio.Event()
                await self._wake.wait()
            return
        self.stop()
        await trio.lowlevel.checkpoint()  # raises Cancelled: the GET is dropped
