"""Making ranges of the sparse file local (trio): the daemon's half of fanotify mode.

    filler = Filler(source, store, window=...)
    await filler.ensure(start, end)      # every block of [start, end) is in the file when it returns

The file is divided into aligned windows (a fetch unit: fewer, larger ranged reads).  A missing
window is read from the source once — concurrent requests for it wait on the same fetch — and
written through ``store`` (sources/diskcache.py DiskCache: pwrite + fdatasync, then its bitmap), in
a worker thread.  Two windows in a row start a read-ahead of the next ``readahead`` windows in the
background.  A failed fetch fails every waiter (the holder then denies with EIO); nothing is
written that did not come whole from the source.  A verified source (verity/source.py) gives a
window's good blocks even when some do not match the tree: those are written, the bad ones stay
holes, and only a fill that needs one of them fails (IntegrityError: the holder denies with EIO).
A source checked underneath (a tar layer over its verified blob) fails a window's read whole: the
window is then narrowed down to the 4 KiB pieces that fail, which stay holes the same way.
"""

from __future__ import annotations

import logging
from collections import deque

import trio

from ...errors import IntegrityError

log = logging.getLogger("erofs_mount.fanotify")
PIECE = 4096    # the unit a window is narrowed down to around a block that fails its check


def verify_entry(store) -> bool:
    """A complete blob entry hashed against its digest (sources/diskcache.py verify; a mismatch
    empties it, so every later read fetches again), said in the log."""
    ok = store.verify()
    log.log(logging.INFO if ok else logging.ERROR, "the complete cache entry %s its digest",
            "matches" if ok else "does NOT match (discarded)")
    return ok


class _Fetch:
    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.error: BaseException | None = None


class Filler:
    def __init__(self, source, store, *, window: int = 1 << 20, readahead: int = 4, verify: bool = False) -> None:
        if window % 4096:
            raise ValueError("window must be a multiple of 4096")
        self.source, self.store = source, store
        self.size = source.size
        self.window = window
        self.readahead = readahead
        self._inflight: dict[int, _Fetch] = {}
        self._recent: deque[int] = deque(maxlen=8)
        self._nursery: trio.Nursery | None = None
        self._verify = verify           # the entry is a blob's: hash it against its digest once complete
        self._verifying = False
        self.stats = {"fills": 0, "fetches": 0, "bytes_fetched": 0, "bytes_written": 0, "fetch_errors": 0,
                      "readahead_windows": 0, "unverified_blocks": 0}
        self._partial = getattr(source, "read_partial", None)  # a verified source: keep a window's good blocks
        self._piece = getattr(source, "dbs", PIECE)    # the unit bad blocks are counted in
        self._holes = False     # a window was written without its bad blocks

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Host the background read-ahead (start it in the daemon's nursery)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def _span(self, w: int) -> tuple[int, int]:
        start = w * self.window
        return start, min(start + self.window, self.size)

    def local(self, start: int, end: int) -> bool:
        return start >= end or self.store.has(start, end)

    async def ensure(self, start: int, end: int) -> None:
        end = min(end, self.size)
        if start >= end:
            return
        self.stats["fills"] += 1
        first, last = start // self.window, (end - 1) // self.window
        async with trio.open_nursery() as nursery:
            for w in range(first, last + 1):
                nursery.start_soon(self._window, w)
        if self._holes and not await trio.to_thread.run_sync(self.local, start, end):
            raise IntegrityError(f"bytes {start}-{end}: a block that does not match the dm-verity tree")
        if self.readahead and self._nursery is not None and first - 1 in self._recent:
            for w in range(last + 1, min(last + 1 + self.readahead, (self.size - 1) // self.window + 1)):
                if w not in self._inflight and not self.local(*self._span(w)):
                    self.stats["readahead_windows"] += 1
                    self._nursery.start_soon(self._background, w)
        self._recent.append(last)

    def _write_around(self, start: int, data: bytes, bad: list[int]) -> int:
        """Write the runs of *data* between its bad blocks (the source's data blocks)."""
        n, pos, end, bs = 0, start, start + len(data), self._piece
        for b in sorted(bad) + [None]:
            stop = end if b is None else max(start, min(end, b * bs))
            if stop > pos:
                n += self.store.write(pos, data[pos - start:stop - start])
            if b is not None:
                pos = max(pos, (b + 1) * bs)
        return n

    async def _around_damage(self, start: int, end: int) -> tuple[bytes, list[int]]:
        """A window whose read failed the integrity check, narrowed down to the 4 KiB pieces from
        the first that fails to the last (two binary searches, ~16 reads for a 1 MiB window): (the
        bytes, zeros in the hole; the hole's block numbers).  The pieces before and after the hole
        are read whole and kept; a piece that fails makes every read that covers it fail."""
        bs = self._piece
        n = (end - start + bs - 1) // bs
        out = bytearray(end - start)

        async def good(a: int, b: int) -> bool:
            """Whether pieces a..b-1 read; their bytes kept when they do."""
            lo, hi = start + a * bs, min(end, start + b * bs)
            try:
                data = await self.source.read_at(lo, hi - lo)
            except IntegrityError:
                return False
            if len(data) != hi - lo:
                raise EOFError(f"short read from the source at {lo}: {len(data)} of {hi - lo} bytes")
            out[lo - start:hi - start] = data
            return True

        ok, bad = 0, n          # the first `ok` pieces read, the first `bad` do not (the window did not)
        while bad - ok > 1:
            mid = (ok + bad) // 2
            if await good(0, mid):
                ok = mid
            else:
                bad = mid
        first = bad - 1         # the first piece that fails
        if await good(first, n):    # it reads now (the damage is gone: fetched again): all is there
            return bytes(out), []
        lo, hi = first, n       # the pieces from `lo` on do not read, from `hi` on they do
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if await good(mid, n):
                hi = mid
            else:
                lo = mid
        return bytes(out), list(range(start // bs + first, start // bs + lo + 1))

    async def _check_digest(self) -> None:
        await trio.to_thread.run_sync(verify_entry, self.store)
        self._verifying = False

    async def _background(self, w: int) -> None:
        try:
            await self._window(w)
        except Exception as exc:  # noqa: BLE001 - a read-ahead failure is only logged; a reader asks again
            log.warning("read-ahead of window %d: %s", w, exc)

    async def _window(self, w: int) -> None:
        start, end = self._span(w)
        fetch = self._inflight.get(w)
        if fetch is not None:
            await fetch.done.wait()
            if fetch.error is not None:
                raise fetch.error
            return
        fetch = self._inflight[w] = _Fetch()     # before any await: one fetch per window
        try:
            if await trio.to_thread.run_sync(self.local, start, end):
                return
            bad: list[int] = []
            if self._partial is not None:
                data, bad = await self._partial(start, end - start)
            else:
                try:
                    data = await self.source.read_at(start, end - start)
                except IntegrityError:  # a source checked underneath (a tar layer's blob): narrow it down
                    data, bad = await self._around_damage(start, end)
            if len(data) != end - start:
                raise EOFError(f"short read from the source at {start}: {len(data)} of {end - start} bytes")
            self.stats["fetches"] += 1
            self.stats["bytes_fetched"] += len(data)
            if bad:
                self._holes = True
                self.stats["unverified_blocks"] += len(bad)
                self.stats["bytes_written"] += await trio.to_thread.run_sync(self._write_around, start, data, bad)
            else:
                self.stats["bytes_written"] += await trio.to_thread.run_sync(self.store.write, start, data)
            if self._verify and self.store.complete and not self.store.verified and not self._verifying:
                self._verifying = True
                if self._nursery is not None:
                    self._nursery.start_soon(self._check_digest)
        except BaseException as exc:
            fetch.error = exc
            self.stats["fetch_errors"] += isinstance(exc, Exception)
            raise
        finally:
            del self._inflight[w]
            fetch.done.set()
