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

Never two copies of a chunk: a stream's Range ends at the first chunk already
had; a read needing a chunk the stream is already let fetch waits for it; one
the stream would reach only later is fetched by the read and the stream stops
there.  (Stopping drops the part of a socket read past the last whole chunk:
``bytes_discarded``.)

Drop-behind: a chunk the stream brought and its reader read leaves the cache
once the reader is ``DROP_LAG`` past it: a sequential reader does not come
back (re-reads are served by the kernel's page cache above us), and a long
stream must neither flush the chunks random readers need (metadata) nor make
the cache grow through fresh memory.  Those chunks are remembered as passed:
another reader's read-ahead window does not fetch them again (a read that
needs one does, and gets a stream if it goes on).

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

import heapq
import logging
from collections import deque
from typing import TYPE_CHECKING

import trio

from ...errors import SourceError
from ..cache import chunk_extent

if TYPE_CHECKING:  # pragma: no cover
    from .blob import OciBlobSource

log = logging.getLogger("erofs_mount.sources.oci")
PASSED_KEPT = 64  # dropped-behind chunk ranges remembered (most recent)
DROP_LAG = 1 << 20  # what a stream brought stays cached this far (at least a chunk) behind its reader


# the error of chunks a stream owed when it ended without failing (superseded, idle, closed):
# a reader waiting for one fetches it itself, whoever asked for it (compared by identity, never raised)
STOPPED = SourceError("read-ahead stream stopped")


class Fetch:
    """One chunk on its way: readers wait on ``event``; then ``data`` or ``error`` is set.
    ``owner`` is the BlobStream that will deliver it, None for an ordinary GET."""

    __slots__ = ("event", "data", "error", "owner", "ok")

    def __init__(self, owner: "BlobStream | None" = None) -> None:
        self.event = trio.Event()
        self.data: bytes | bytearray | memoryview | None = None
        self.error: BaseException | None = None
        self.owner = owner
        self.ok = False  # the source's cache gate took the data (verity: it verified every block)


class Streams:
    """The read-ahead streams of one source (at most ``connections``), least recently used first.

    *gap* (chunks): a reader waits for a stream to bring a chunk at most this far ahead of
    it; further ahead it fetches the chunk itself (``claim``, ``OciBlobSource._get``)."""

    def __init__(self, src: "OciBlobSource", gap: int) -> None:
        self.src = src
        self.gap = gap
        self.lag = max(1, DROP_LAG // src.chunk_size)  # chunks
        self._all: list[BlobStream] = []
        self._dropped: deque[list[int]] = deque(maxlen=PASSED_KEPT)  # [lo, hi) chunk ranges dropped behind

    def claim(self, i: int) -> list[int]:
        """A read needs chunk *i*, which nobody fetches.  A stream already let fetch it (and
        near it) brings it: returns [i], registered to that stream.  A stream that would only
        reach it later stops there instead (the reader's own GET brings it; no chunk is fetched
        twice).  Else []."""
        for s in self._all:
            if s.active and s.next <= i < s.end:
                if i < s.limit and i - s.next < self.gap:
                    self.src._inflight[i] = Fetch(s)
                    return [i]
                if i >= s.limit:
                    s.truncate(i)
        return []

    def passed(self, i: int) -> bool:
        """Did a stream bring chunk *i* to its reader and drop it behind (recently)?"""
        return any(lo <= i < hi for lo, hi in self._dropped)

    def note_dropped(self, i: int) -> None:
        last = self._dropped[-1] if self._dropped else None
        if last is not None and last[1] == i:
            last[1] = i + 1  # the usual case: a reader going forward
        elif last is None or not last[0] <= i < last[1]:
            self._dropped.append([i, i + 1])

    def __len__(self) -> int:
        return len(self._all)

    def follow(self, idx: range, window: int) -> list[int]:
        """A sequential read of chunks *idx*: let the stream it follows run *window* chunks past
        it, or start one at the first chunk of that window nobody has.  Returns the read's own
        chunks the stream will bring."""
        src = self.src
        if src._closed:
            return []
        target = min(src._nchunks, idx[-1] + 1 + window)
        have = lambda i: i in src._inflight or i in src.cache  # noqa: E731
        own = next((i for i in idx if not have(i)), None)  # the read's own first missing chunk
        stream = next((s for s in reversed(self._all) if s.holds(idx[0])), None)  # the usual case
        if stream is not None and own is not None and own < stream.next:
            stream = None  # a reader back where the stream dropped (or the cache evicted): a stream of its own
        if stream is None:
            first = own
            if first is None:  # read-ahead only: not what a stream already brought and dropped
                first = next((i for i in range(idx[-1] + 1, target) if not have(i) and not self.passed(i)), None)
            if first is None:
                return []  # nothing to fetch yet
            # (everything from the read to *first* is had: a stream that reaches *first* next serves it)
            stream = next((s for s in reversed(self._all) if s.follows(first)), None)
            if stream is None:
                stream = self._start(first)
                if stream is None:
                    return []
        if stream is not self._all[-1]:  # most recently used last
            self._all.remove(stream)
            self._all.append(stream)
        src._n["dropped_behind"] += stream.read_through(idx)
        got = stream.advance(target)
        own = [i for i in got if i <= idx[-1]]
        src._n["prefetched_chunks"] += len(got) - len(own)
        return own

    def _start(self, first: int) -> "BlobStream | None":
        src = self.src
        if src._on_disk(first):
            return None  # the persistent cache serves it
        # the Range ends where chunks are already had (cached, under way, on disk): nothing is
        # fetched twice; past them the reader's next read starts another stream
        end = min((i for i in (*src.cache.indexes(), *src._inflight) if i > first), default=src._nchunks)
        if not self.passed(first):  # nor what streams dropped behind (unless a reader came back into it)
            end = min([end, *(lo for lo, _ in self._dropped if lo > first)])
        if src.disk is not None:  # (the persistent cache looked up a window ahead)
            end = next((i for i in range(first + 1, min(end, first + 1 + src.readahead.max_chunks))
                        if src._on_disk(i)), end)
        for other in self._all:
            if other.next <= first < other.end:
                other.truncate(first)  # never two streams bringing the same chunks
        s = BlobStream(self, first, end)
        while len(self._all) >= src.options.connections:
            self._all.pop(0).stop()  # the least recently used one
        self._all.append(s)
        src._bg_scopes.add(s.scope)
        src._n["streams"] += 1
        trio.lowlevel.spawn_system_task(s.run, name=f"read-ahead stream {first}..{end}")
        return s

    def stop_all(self) -> None:
        for s in list(self._all):
            s.stop()

    def arrived(self, i: int, data) -> None:
        """A stream brought chunk *i*: complete whatever waits for it (its own Fetch, or an
        ordinary GET it overtook), else just cache it."""
        f = self.src._inflight.get(i)
        if f is not None:
            self.src._complete(i, f, data)
        else:
            self.src._keep(i, data)

    def ended(self, stream: "BlobStream", error: BaseException) -> None:
        src = self.src
        if stream in self._all:
            self._all.remove(stream)
        src._bg_scopes.discard(stream.scope)
        owed = [(i, f) for i in range(stream.next, stream.limit)
                if (f := src._inflight.get(i)) is not None and f.owner is stream]
        src._fail(owed, error)


class BlobStream:
    def __init__(self, group: Streams, first: int, end: int) -> None:
        self.group = group
        self.src = group.src
        self.first = first  # chunk the stream started at
        self.next = first  # next chunk to arrive
        self.end = end  # chunk index where it stops (moved back when another stream starts there)
        self.range_end = end  # chunk index past the Range asked for
        self.limit = first  # chunks below this may be fetched now; the stream pauses there
        self._read: list[int] = []  # a heap of the chunks its reader read (to drop behind it)
        self.scope = trio.CancelScope()
        self.active = True
        self._wake = trio.Event()

    def __repr__(self) -> str:
        return f"BlobStream(chunks {self.first}..{self.end}, next={self.next}, limit={self.limit})"

    def holds(self, chunk: int) -> bool:
        """Is *chunk* within what this stream was already let fetch (its reader continuing)?"""
        return self.active and self.first <= chunk <= self.limit and chunk < self.end

    def follows(self, chunk: int) -> bool:
        """Is *chunk* next in line for this stream, nothing unasked-for before it?"""
        return self.active and self.next <= chunk <= self.limit and chunk < self.end

    def read_through(self, idx: range) -> int:
        """Its reader read chunks *idx*: those it read more than ``DROP_LAG`` before leave the
        cache (only chunks this stream brought AND its reader read: another reader's chunks
        inside the window stay; the lag absorbs reordered reads and a reader stepping back a
        little, e.g. to metadata between file data).  Returns the chunks dropped."""
        for i in idx:
            if self.first <= i < self.end:
                heapq.heappush(self._read, i)
        keep_from = idx[0] - self.group.lag
        cache, n = self.src.cache, 0
        while self._read and self._read[0] < keep_from:
            i = heapq.heappop(self._read)
            if cache.discard(i):
                self.group.note_dropped(i)
                n += 1
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
            self.group.ended(self, error)

    def _deliver(self, offset: int, data: bytearray) -> None:
        i = offset // self.src.chunk_size
        self.next = i + 1
        self.group.arrived(i, data)

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
