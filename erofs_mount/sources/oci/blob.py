"""OciBlobSource: one registry blob, pinned by digest, read lazily in aligned chunks.

Reads are split into ``chunk_size`` chunks kept in a byte-bounded LRU.  A chunk
being fetched is registered in ``_inflight`` before the first await, so
concurrent readers of it wait for the same GET (coalescing).  Consecutive
missing chunks go out as one Range GET of at most ``max_request`` bytes, and
every GET hands its chunks over one by one as the body streams in, so a read
returns as soon as its own chunks are there.  A sequential reader grows a
read-ahead window (``cache.ReadAhead``); the chunks past its read join the
read's own GET, or queue (lowest offset first) for one of ``connections``
read-ahead slots.  GETs run in trio system tasks owned by the source (no
nursery is needed from the caller); ``aclose()`` cancels them.  With
``oci.cache`` chunks also go to the persistent per-digest cache
(``diskcache.py``), which is read before the network.
"""

from __future__ import annotations

import heapq
import logging

import trio

from ...errors import NotErofsError, SourceError
from ..cache import ChunkCache, ReadAhead, assemble, chunk_extent, chunk_range, clamp, runs
from ..diskcache import DiskCache, default_root, enforce_limit
from .client import RegistryClient
from .manifest import EROFS_SUPER_OFFSET, check_erofs_magic, check_layer_media_type, select_layer
from .options import OciOptions
from .reference import Reference, parse_reference
from .resolve import options_with, resolve

log = logging.getLogger("erofs_mount.sources.oci")


class _Fetch:
    __slots__ = ("event", "data", "error")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.data: bytes | bytearray | memoryview | None = None
        self.error: BaseException | None = None


class OciBlobSource:
    def __init__(self, client: RegistryClient, *, digest: str, size: int, media_type: str,
                 ref: Reference, platform: str, layer_index: int, manifest_digest: str,
                 options: OciOptions) -> None:
        self.client = client
        self.digest = digest
        self.size = size
        self.media_type = media_type
        self.ref = ref
        self.platform = platform
        self.layer_index = layer_index
        self.manifest_digest = manifest_digest
        self.options = options
        self.chunk_size = options.chunk_size
        self._nchunks = (size + self.chunk_size - 1) // self.chunk_size
        self._max_run = max(1, options.max_request // self.chunk_size)
        self.cache = ChunkCache(options.memory_limit)
        self.disk: DiskCache | None = None  # persistent cache entry (attach_disk_cache)
        self._disk_verifying = False
        self.readahead = ReadAhead(self.chunk_size, options.readahead)
        self._inflight: dict[int, _Fetch] = {}
        self._queue: list = []  # read-ahead runs waiting for a slot: (first, count, fetches), a heap
        self._active = 0  # read-ahead runs under way
        self._bg_scopes: set[trio.CancelScope] = set()  # read-ahead tasks
        self._write_scopes: set[trio.CancelScope] = set()  # persistent cache writes
        self._closed = False
        self._n = {"reads": 0, "coalesced": 0, "prefetched_chunks": 0, "fetch_failures": 0, "promoted": 0,
                   "disk_hits": 0, "disk_bytes_written": 0, "disk_errors": 0}

    # -- public -------------------------------------------------------------------------
    async def read_at(self, offset: int, length: int) -> bytes:
        if self._closed:
            raise SourceError(f"{self.ref}: source is closed")
        offset, length = clamp(offset, length, self.size)
        if length == 0:
            return b""
        self._n["reads"] += 1
        cs = self.chunk_size
        idx = chunk_range(offset, length, cs)
        have: dict[int, bytes] = {}
        for i in idx:
            data = self.cache.get(i)
            if data is not None:
                have[i] = data
        window = self.readahead.observe(offset, length)
        if len(have) < len(idx):
            have.update(await self._get(
                [i for i in idx if i not in have],
                prefetch=range(idx[-1] + 1, min(self._nchunks, idx[-1] + 1 + window)),
            ))
        elif window:
            self._prefetch(range(idx[-1] + 1, min(self._nchunks, idx[-1] + 1 + window)))
        return assemble(have, offset, length, cs)

    def stats(self) -> dict:
        c = self.client.counters
        return {
            "size": self.size, "digest": self.digest, "chunk_size": self.chunk_size,
            "bytes_fetched": c["bytes_fetched"], "requests": c["requests"], "retries": c["retries"],
            "failures": c["failures"], "token_requests": c["token_requests"], "redirects": c["redirects"],
            "range_ignored": c["range_ignored"], "cache_hits": self.cache.hits, "cache_misses": self.cache.misses,
            "cache_bytes": self.cache.used, "cache_evictions": self.cache.evictions, **self._n,
        }

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        queued, self._queue = self._queue, []
        for _, _, fetches in queued:
            self._release(fetches)
        for scope in list(self._bg_scopes):
            scope.cancel()
        with trio.CancelScope(shield=True):  # runs to the end even when the caller is cancelled
            # let cancelled read-ahead tasks unwind before their connections are closed under them,
            # and queued cache writes finish (bounded)
            with trio.move_on_after(10):
                while self._bg_scopes or self._write_scopes:
                    await trio.sleep(0.001)
            for scope in list(self._write_scopes):
                scope.cancel()  # writes not started yet are dropped; one in a thread finishes
            with trio.move_on_after(30):
                while self._write_scopes:
                    await trio.sleep(0.001)
            await self.client.aclose()
        if self.disk is not None and not self._write_scopes:  # never close an fd a thread still writes to
            self.disk.close()
            self.disk = None

    @property
    def credentials_origin(self) -> str | None:
        """Where the credentials in use came from ("oci.password", "environment", a config file,
        "docker-credential-NAME"), None when anonymous: a recovery record needs to keep a secret
        only when it came from the command line."""
        creds = self.client._creds
        return creds.origin if creds is not None else None

    def __repr__(self) -> str:
        return f"OciBlobSource({self.ref} {self.digest}, size={self.size})"

    # -- fetching ---------------------------------------------------------------------------
    async def _get(self, wanted: list[int], prefetch: range) -> dict[int, bytes]:
        mine = [i for i in wanted if i not in self._inflight]
        for i in mine:
            self._inflight[i] = _Fetch()
        fetches = {i: self._inflight[i] for i in wanted}
        self._n["coalesced"] += len(wanted) - len(mine)
        # the read's own chunks and the read-ahead after them go out together: a run that holds
        # demand chunks is not queued behind read-ahead, and since every GET is delivered chunk by
        # chunk this read returns as soon as its own chunks are in
        self._spawn_runs(sorted(mine + self._plan_prefetch(prefetch)), demand=set(mine))
        if self._queue and len(mine) < len(wanted):
            self._promote(set(wanted) - set(mine))
        out: dict[int, bytes] = {}
        for i in wanted:
            f = fetches[i]
            await f.event.wait()
            if f.data is not None:
                out[i] = f.data
            elif i in mine:
                raise _as_source_error(f.error, self)
            else:  # someone else's fetch (e.g. a read-ahead) failed: try once ourselves
                out[i] = await self._fetch_one(i)
        return out

    async def _fetch_one(self, i: int) -> bytes:
        f = self._inflight.get(i)
        if f is None:
            f = self._inflight[i] = _Fetch()
            await self._fetch_run(i, 1)
        else:
            await f.event.wait()
        if f.data is None:
            raise _as_source_error(f.error, self)
        return f.data

    async def _fetch_run(self, first: int, count: int) -> None:
        """Fetch chunks [first, first+count) (already registered in _inflight) in one GET, each
        chunk handed to its waiters as soon as its bytes are in.

        Never raises an ordinary exception: the outcome goes to each chunk's _Fetch."""
        cs = self.chunk_size
        start, _ = chunk_extent(first, cs, self.size)
        _, end = chunk_extent(first + count - 1, cs, self.size)
        fetches = {i: self._inflight[i] for i in range(first, first + count)}

        def deliver(offset: int, data, from_disk: bool = False) -> None:
            i = offset // cs
            f = fetches[i]
            self.cache.put(i, data)
            f.data = data
            if self._inflight.get(i) is f:
                del self._inflight[i]
            f.event.set()
            if not from_disk and self.disk is not None and not self._closed:
                self._spawn(self._disk_write, offset, data, name=f"cache write {offset}")

        try:
            data = await self._disk_read(start, end)
            if data is not None:
                view = memoryview(data)
                for k in range(count):
                    deliver(start + k * cs, view[k * cs:(k + 1) * cs], True)
                self._n["disk_hits"] += count
            else:
                await self.client.fetch_range(self.digest, start, end, piece=cs, deliver=deliver)
        except BaseException as exc:
            for i, f in fetches.items():
                if f.event.is_set():
                    continue  # delivered before the failure
                f.error = exc
                if self._inflight.get(i) is f:
                    del self._inflight[i]
                f.event.set()
            if not isinstance(exc, Exception):
                raise

    # -- persistent cache -----------------------------------------------------------------
    async def attach_disk_cache(self, root: str, limit: int) -> None:
        """Use (and fill) the persistent cache entry of this blob under *root*; failures only log."""
        if self.size > limit:
            log.info("%s: blob larger than cache_limit=%d: not cached on disk", self.digest, limit)
            return
        try:
            self.disk = await trio.to_thread.run_sync(DiskCache.open, root, self.digest, self.size)
            await trio.to_thread.run_sync(lambda: enforce_limit(root, limit, keep=self.disk.path))
        except OSError as exc:
            log.warning("persistent cache under %s unusable (%s): continuing without it", root, exc)
            self.disk = None
        self._disk_root, self._disk_limit = root, limit

    def _disk_failed(self, exc: BaseException) -> None:
        self._n["disk_errors"] += 1
        log.warning("persistent cache %s: %s: continuing without it", self.disk.path if self.disk else "?", exc)
        disk, self.disk = self.disk, None
        if disk is not None:
            disk.close()

    async def _disk_read(self, start: int, end: int):
        disk = self.disk
        if disk is None:
            return None
        try:
            if not disk.has(start, end):
                return None
            return await trio.to_thread.run_sync(disk.read, start, end)
        except OSError as exc:
            self._disk_failed(exc)
            return None

    async def _disk_write(self, start: int, data) -> None:
        disk = self.disk
        if disk is None:
            return
        try:
            n = await trio.to_thread.run_sync(disk.write, start, data)
            self._n["disk_bytes_written"] += n
            if n and disk.written // (256 << 20) != (disk.written - n) // (256 << 20):  # keep the root bounded
                await trio.to_thread.run_sync(lambda: enforce_limit(self._disk_root, self._disk_limit, keep=disk.path))
            if disk.complete and not disk.verified and not self._disk_verifying:
                self._disk_verifying = True
                try:
                    await trio.to_thread.run_sync(disk.verify)
                finally:
                    self._disk_verifying = False
        except OSError as exc:
            self._disk_failed(exc)

    def _spawn(self, afn, *args, name: str) -> None:
        """A cache write in the background: aclose() lets these finish (bounded) before closing."""
        scope = trio.CancelScope()
        self._write_scopes.add(scope)  # registered now: aclose() must wait even for a task not started yet
        trio.lowlevel.spawn_system_task(self._background, scope, afn, *args, name=name)

    async def _background(self, scope: trio.CancelScope, afn, *args) -> None:
        try:
            with scope:
                await afn(*args)
        except BaseException as exc:  # a system task must never raise
            log.debug("background task ended: %r", exc)
        finally:
            self._write_scopes.discard(scope)

    def _prefetch(self, chunks: range) -> None:
        self._spawn_runs(self._plan_prefetch(chunks), demand=set())

    def _plan_prefetch(self, chunks: range) -> list[int]:
        """Register (not fetch) the read-ahead chunks worth asking for now."""
        if not chunks or self._closed:
            return []
        # Batch: while the chunk right after the read is already on its way, wait until a
        # worthwhile run (half a window, at most one request) is missing before asking, so
        # read-ahead goes out in large GETs rather than one chunk at a time.
        batch = min(self._max_run, max(1, len(chunks) // 2))
        have = lambda i: i in self._inflight or i in self.cache  # noqa: E731
        if have(chunks.start):
            # steady state: the missing chunks are a tail of the window; count it from the end
            # (cheap) before scanning the whole window on every read
            tail = 0
            for i in reversed(chunks):
                if have(i) or tail >= batch:
                    break
                tail += 1
            if tail < batch:
                return []
        todo = [i for i in chunks if not have(i)]
        if not todo or (todo[0] != chunks.start and len(todo) < batch):
            return []
        for i in todo:
            self._inflight[i] = _Fetch()
        self._n["prefetched_chunks"] += len(todo)
        return todo

    def _spawn_runs(self, chunks: list[int], *, demand: set[int]) -> None:
        """One background GET per run of consecutive registered chunks.  Runs holding demand
        chunks start at once; read-ahead runs queue, lowest offset first, for one of the
        ``connections`` read-ahead slots (so the chunk a reader waits for next is never stuck
        behind read-ahead further out)."""
        for first, count in runs(chunks, self._max_run):
            fetches = [(i, self._inflight[i]) for i in range(first, first + count)]
            if any(i in demand for i in range(first, first + count)):
                trio.lowlevel.spawn_system_task(self._background_run, first, count, fetches, False,
                                                name=f"fetch {first}+{count}")
            else:
                heapq.heappush(self._queue, (first, count, fetches))
        self._pump()

    def _promote(self, chunks: set[int]) -> None:
        """A reader waits for chunks whose read-ahead run is still queued: start it now."""
        urgent = [e for e in self._queue if any(e[0] <= i < e[0] + e[1] for i in chunks)]
        if not urgent:
            return
        self._queue = [e for e in self._queue if e not in urgent]
        heapq.heapify(self._queue)
        self._n["promoted"] += len(urgent)
        for first, count, fetches in urgent:
            trio.lowlevel.spawn_system_task(self._background_run, first, count, fetches, False,
                                            name=f"fetch {first}+{count}")

    def _pump(self) -> None:
        while self._queue and self._active < self.options.connections and not self._closed:
            first, count, fetches = heapq.heappop(self._queue)
            self._active += 1
            trio.lowlevel.spawn_system_task(self._background_run, first, count, fetches, True,
                                            name=f"read-ahead {first}+{count}")

    async def _background_run(self, first: int, count: int, fetches: list, readahead: bool) -> None:
        scope = trio.CancelScope()
        self._bg_scopes.add(scope)
        try:
            with scope:
                if self._closed:
                    return
                await self._fetch_run(first, count)
        except BaseException as exc:  # a system task must never raise; readers refetch on demand
            log.debug("fetch of chunks %d+%d ended: %r", first, count, exc)
        finally:
            self._bg_scopes.discard(scope)
            if readahead:  # it held a read-ahead slot
                self._active -= 1
                self._pump()
            self._release(fetches)

    def _release(self, fetches: list) -> None:
        """Fail what was never delivered (a closed source): never leave a waiter hanging."""
        for i, f in fetches:
            if not f.event.is_set():
                f.error = SourceError(f"{self.ref}: fetch cancelled (source closed)")
                if self._inflight.get(i) is f:
                    del self._inflight[i]
                f.event.set()
        if any(f.error is not None for _, f in fetches):
            self._n["fetch_failures"] += 1


def _as_source_error(exc: BaseException | None, src: "OciBlobSource") -> SourceError:
    if isinstance(exc, SourceError):
        return exc
    return SourceError(f"{src.ref}: reading blob {src.digest} failed: {exc!r}")


async def open_oci_source(
    ref: str | Reference,
    *,
    options: OciOptions | None = None,
    layer: int | None = None,
    blob: str | None = None,
    platform: str | None = None,
    env: dict | None = None,
    check_magic: bool = True,
) -> OciBlobSource:
    """Resolve *ref* once, pin the blob digest and return a source reading it.

    *layer*/*blob*/*platform* override the same fields of *options*; *env*
    replaces ``os.environ`` for credential look-ups; ``check_magic=False``
    skips the superblock check (extra devices of a multi-device image)."""
    options = options_with(options, layer=layer, blob=blob, platform=platform)
    if isinstance(ref, str):
        ref = parse_reference(ref)
    client = RegistryClient(ref, options, env=env)
    try:
        res = await resolve(client, ref, options)
        index, desc = select_layer(res.manifest, layer=options.layer, blob=options.blob)
        check_layer_media_type(desc)
        src = OciBlobSource(
            client, digest=desc.digest, size=desc.size, media_type=desc.media_type,
            ref=res.ref, platform=res.platform, layer_index=index,
            manifest_digest=res.manifest_digest, options=options,
        )
        if options.cache is not None:
            await src.attach_disk_cache(options.cache or default_root(), options.cache_limit)
        if check_magic:
            what = f"{ref} layer {index} ({desc.digest})"
            if desc.size < EROFS_SUPER_OFFSET + 4:
                raise NotErofsError(f"{what}: {desc.size} bytes, too small to be an EROFS image")
            check_erofs_magic(await src.read_at(0, EROFS_SUPER_OFFSET + 4), what)
        return src
    except BaseException:
        with trio.CancelScope(shield=True):
            await client.aclose()
        raise
