"""OciBlobSource: one registry blob, pinned by digest, read lazily in aligned chunks.

Reads are split into ``chunk_size`` chunks kept in a byte-bounded LRU.  A chunk
being fetched is registered in ``_inflight`` (a ``stream.Fetch``) before the
first await, so concurrent readers of it wait for the same GET (coalescing).
A read's missing chunks go out at once as Range GETs of at most
``max_request`` bytes (consecutive chunks in one GET), each handed over chunk
by chunk as the body streams in.  A reader detected as sequential
(``cache.ReadAhead``) gets read-ahead from ONE long streaming Range GET (a
``stream.BlobStream``, with backpressure) instead of a GET per window; at most
``connections`` such streams run at once.  A reader that needs a chunk its
stream will only reach much later fetches it itself; chunks a stream brought
leave the LRU once its reader is well past them (drop-behind: a long read
neither flushes other readers' chunks nor grows the cache).  GETs run in trio system
tasks owned by the source (no nursery is needed from the caller); ``aclose()``
cancels them.  With ``oci.cache`` chunks also go to the persistent per-digest
cache (``diskcache.py``), which is read before the network.
"""

from __future__ import annotations

import logging

import trio

from ...errors import NotErofsError, SourceError, UsageError
from ..cache import ChunkCache, ReadAhead, assemble, chunk_extent, chunk_range, clamp, runs
from ..diskcache import DiskCache, default_root
from .blobdisk import DiskCacheMixin
from .client import RegistryClient
from .mirrored import MirroredClient
from .manifest import EROFS_SUPER_OFFSET, check_erofs_magic, check_layer_media_type, select_layer
from .options import OciOptions
from .reference import Reference, parse_reference
from .resolve import Resolution, options_with, resolve
from .stream import STOPPED, Fetch, Streams
from .zstdsource import ZstdSeekableSource, is_zstd_layer, open_zstd_layer
from ..tarlayer.kinds import layer_kind
from ...verity.options import tar_choice

log = logging.getLogger("erofs_mount.sources.oci")
PROMOTE_GAP = 4 << 20  # a chunk further than this ahead of its stream is fetched by its reader at once


class OciBlobSource(DiskCacheMixin):
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
        self.chunk_size = cs = options.chunk_size
        self._nchunks = (size + cs - 1) // cs
        self._max_run = max(1, options.max_request // cs)
        self.cache = ChunkCache(options.memory_limit)
        self.disk: DiskCache | None = None  # persistent cache entry (attach_disk_cache)
        # the cache gate: accept(offset, data) says whether a chunk may be cached (verity/source.py:
        # only verified chunks); None caches everything
        self.accept = None
        self.verity = None  # the trusted root hash choice, when the caller verifies itself (NBD: dm-verity)
        self._disk_verifying = False
        # read-ahead never outruns half the memory cache: what it brings must still be there when read
        self.readahead = ReadAhead(cs, min(options.readahead, options.memory_limit // 2))
        self._inflight: dict[int, Fetch] = {}
        self._streams = Streams(self, max(2, PROMOTE_GAP // cs))  # running read-ahead streams
        self._bg_scopes: set[trio.CancelScope] = set()  # GET tasks
        self._write_scopes: set[trio.CancelScope] = set()  # persistent cache writes
        self._closed = False
        self._n = {"reads": 0, "coalesced": 0, "prefetched_chunks": 0, "fetch_failures": 0, "promoted": 0,
                   "streams": 0, "dropped_behind": 0, "disk_hits": 0, "disk_bytes_written": 0, "disk_errors": 0,
                   "direct_reads": 0}

    # -- public -------------------------------------------------------------------------
    async def read_at(self, offset: int, length: int) -> bytes:
        return (await self.read_trusted(offset, length))[0]

    async def read_trusted(self, offset: int, length: int) -> tuple[bytes, bool]:
        """(the bytes, whether the cache gate passed every chunk of them: with a verity gate, the
        memory cache holds only verified chunks, and a fetched chunk says whether it was)."""
        if self._closed:
            raise SourceError(f"{self.ref}: source is closed")
        offset, length = clamp(offset, length, self.size)
        if length == 0:
            return b"", True
        cs = self.chunk_size
        idx = chunk_range(offset, length, cs)
        have: dict[int, bytes] = {}
        for i in idx:
            data = self.cache.get(i)
            if data is not None:
                have[i] = data
        streamed = self._note_read(offset, length, idx)
        trusted = [True]
        if len(have) < len(idx):
            have.update(await self._get([i for i in idx if i not in have], streamed, trusted))
        return assemble(have, offset, length, cs), trusted[0] and self.accept is not None

    def read_memory(self, offset: int, length: int) -> bytes | None:
        """Sync, on the trio thread, no I/O: the bytes when the memory cache holds every chunk of
        the range, else None (nothing recorded: ``read_at`` does it).  A hit is a read as
        ``read_at`` makes it (counted, seen by the read-ahead, which may start or move a stream):
        the FUSE daemon answers it inline instead of a worker thread's round trip through the loop
        (~30k such reads of a cold walk took ~9 s).  With a cache gate every chunk here passed it."""
        if self._closed:
            return None
        offset, length = clamp(offset, length, self.size)
        if length == 0:
            return b""
        cs = self.chunk_size
        idx = chunk_range(offset, length, cs)
        cache = self.cache
        if not all(i in cache for i in idx):
            return None
        have = {i: cache.get(i) for i in idx}
        self._note_read(offset, length, idx)
        return assemble(have, offset, length, cs)

    def _note_read(self, offset: int, length: int, idx: range) -> list[int]:
        """A read of chunks *idx* (``read_trusted``, ``read_memory``): counted and shown to the
        read-ahead, which may start or move a stream; the read's own chunks that stream brings."""
        self._n["reads"] += 1
        window = self.readahead.observe(offset, length)
        return self._streams.follow(idx, window) if window else []

    def read_cached(self, offset: int, length: int) -> bytes | None:
        """What the FUSE daemon may answer inline: the memory cache's chunks, else the persistent
        cache's blocks the page cache holds (``pread_cached(nowait=True)``), else None."""
        data = self.read_memory(offset, length)
        return data if data is not None else self.pread_cached(offset, length, nowait=True)

    def set_gate(self, accept) -> None:
        """Install the cache gate; what the memory cache took before it (the opening reads) goes."""
        self.accept = accept
        for i in list(self.cache.indexes()):
            self.cache.discard(i)

    def stats(self) -> dict:
        c = self.client.counters
        return {
            "size": self.size, "digest": self.digest, "chunk_size": self.chunk_size,
            "bytes_fetched": c["bytes_fetched"], "bytes_discarded": c["bytes_discarded"],
            "requests": c["requests"], "retries": c["retries"],
            "failures": c["failures"], "token_requests": c["token_requests"], "redirects": c["redirects"],
            "range_ignored": c["range_ignored"], "cache_hits": self.cache.hits, "cache_misses": self.cache.misses,
            "cache_bytes": self.cache.used, "cache_evictions": self.cache.evictions,
            "streams_active": len(self._streams), **self._n,
            "hosts": dict(getattr(self.client, "served", {})),    # blob bytes per host (mirrored.py)
        }

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._streams.stop_all()
        for scope in list(self._bg_scopes):
            scope.cancel()
        with trio.CancelScope(shield=True):  # runs to the end even when the caller is cancelled
            # let cancelled GET tasks unwind before their connections are closed under them,
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
    async def _get(self, wanted: list[int], streamed, trusted: list | None = None) -> dict[int, bytes]:
        """The chunks *wanted* (none cached): coalesced with fetches under way, the rest fetched
        now.  *streamed* are those this read just handed to a stream: its own, like the rest.
        ``trusted[0]`` is set False when a chunk did not pass the cache gate."""
        inflight = self._inflight
        own = set(streamed)
        for i in wanted:  # never two copies of a chunk: a stream passing there brings it, or stops there
            if i not in inflight:
                own.update(self._streams.claim(i))
        mine = [i for i in wanted if i not in inflight]
        for i in mine:
            inflight[i] = Fetch()
        fetches = {i: inflight[i] for i in wanted}
        own.update(mine)
        self._n["coalesced"] += len(wanted) - len(own)
        # a chunk its stream reaches only much later (a reader jumping ahead in the window, a slow
        # stream): fetched now, the Fetch passing to that GET (whichever brings it first completes it)
        for i in wanted:
            owner = fetches[i].owner
            if owner is not None and i - owner.next >= self._streams.gap:
                fetches[i].owner = None
                mine.append(i)
                own.add(i)
                self._n["promoted"] += 1
        for first, count in runs(mine, self._max_run):
            self._spawn_get([(i, fetches[i]) for i in range(first, first + count)])
        out: dict[int, bytes] = {}
        for i in wanted:
            f = fetches[i]
            await f.event.wait()
            if f.data is not None:
                out[i] = f.data
                ok = f.ok
            elif i in own and f.error is not STOPPED:
                raise _as_source_error(f.error, self)
            else:  # another reader's fetch failed, or a stream stopped: try once ourselves
                out[i], ok = await self._fetch_one(i)
            if trusted is not None and not ok:
                trusted[0] = False
        return out

    async def _fetch_one(self, i: int) -> tuple[bytes, bool]:
        f = self._inflight.get(i)
        if f is None:
            f = self._inflight[i] = Fetch()
            await self._fetch_run([(i, f)])
        else:
            await f.event.wait()
        if f.data is None:
            raise _as_source_error(f.error, self)
        return f.data, f.ok

    def _spawn_get(self, fetches: list) -> None:
        scope = trio.CancelScope()
        self._bg_scopes.add(scope)
        trio.lowlevel.spawn_system_task(self._background_get, scope, fetches, name=f"fetch {fetches[0][0]}+{len(fetches)}")

    async def _background_get(self, scope: trio.CancelScope, fetches: list) -> None:
        try:
            with scope:
                if not self._closed:
                    await self._fetch_run(fetches)
        except BaseException as exc:  # a system task must never raise; readers see the Fetch
            log.debug("fetch of chunks %d+%d ended: %r", fetches[0][0], len(fetches), exc)
        finally:
            self._bg_scopes.discard(scope)
            self._release(fetches)

    async def _fetch_run(self, fetches: list) -> None:
        """Fetch consecutive chunks [(index, Fetch)] in one GET (or one disk read), each chunk
        handed to its waiters as soon as its bytes are in.

        Never raises an ordinary exception: the outcome goes to each chunk's Fetch."""
        cs = self.chunk_size
        first, count = fetches[0][0], len(fetches)
        start, _ = chunk_extent(first, cs, self.size)
        _, end = chunk_extent(first + count - 1, cs, self.size)
        by_index = dict(fetches)
        try:
            read = await self._disk_read(start, end, [chunk_extent(first + k, cs, self.size) for k in range(count)])
            if read is not None:
                data, marked = read
                view = memoryview(data)
                for k in range(count):
                    self._complete(first + k, by_index[first + k], view[k * cs:(k + 1) * cs], from_disk=True,
                                   marked=marked[k])
                self._n["disk_hits"] += count
            else:
                await self.client.fetch_range(self.digest, start, end, piece=cs,
                                              deliver=lambda off, d: self._complete(off // cs, by_index[off // cs], d))
        except BaseException as exc:
            self._fail(fetches, exc)
            if not isinstance(exc, Exception):
                raise

    def _gate(self, i: int, data, from_disk: bool, marked: bool = False) -> bool:
        """Whether chunk *i* may be cached: no gate; or read from the persistent cache and marked
        verified there before and after the read (*marked*: before; trusted without hashing again);
        or the gate (verity: every block checked) says so."""
        if self.accept is None:
            return True
        if from_disk and marked and self.verified_on_disk(i * self.chunk_size, len(data)):
            return True
        return self.accept(i * self.chunk_size, data)

    def _complete(self, i: int, f: Fetch, data, *, from_disk: bool = False, marked: bool = False) -> None:
        """Chunk *i* arrived for Fetch *f* (maybe already completed by someone faster)."""
        ok = self._gate(i, data, from_disk, marked)
        if f.event.is_set():
            if ok and i not in self.cache:
                self.cache.put(i, data)
            return
        if ok:
            self.cache.put(i, data)
        f.data = data
        f.ok = ok
        if self._inflight.get(i) is f:
            del self._inflight[i]
        f.event.set()
        if ok and self.disk is not None and not self._closed and (
                not from_disk or (self.accept is not None and not self.verified_on_disk(i * self.chunk_size, len(data)))):
            self._spawn(self._disk_write, i * self.chunk_size, data, self.accept is not None,
                        name=f"cache write {i}")

    def _fail(self, fetches: list, exc: BaseException) -> None:
        """Fail what was not delivered: never leave a waiter hanging."""
        failed = False
        for i, f in fetches:
            if f.event.is_set():
                continue  # delivered before the failure
            f.error = exc
            if self._inflight.get(i) is f:
                del self._inflight[i]
            f.event.set()
            failed = True
        if failed and exc is not STOPPED:
            self._n["fetch_failures"] += 1

    def _release(self, fetches: list) -> None:
        if any(not f.event.is_set() for _, f in fetches):  # cancelled before it ran (a closed source)
            self._fail(fetches, SourceError(f"{self.ref}: fetch cancelled (source closed)"))

    def _keep(self, i: int, data) -> None:
        """Chunk *i* arrived that nobody waits for (a stream passing by): cache it."""
        if i not in self.cache and self._gate(i, data, False):
            self.cache.put(i, data)
            if self.disk is not None and not self._closed:
                self._spawn(self._disk_write, i * self.chunk_size, data, self.accept is not None,
                        name=f"cache write {i}")

    def forget(self, offset: int, length: int) -> None:
        """Drop what the caches hold of [offset, offset+length) (memory chunks, persistent cache
        blocks): the next read fetches it again (verity/source.py, after a block did not verify)."""
        offset, length = clamp(offset, length, self.size)
        if length == 0:
            return
        self._distrust()
        for i in chunk_range(offset, length, self.chunk_size):
            self.cache.discard(i)
        if self.disk is not None:
            try:
                self.disk.forget(offset, offset + length)
            except OSError as exc:
                self._disk_failed(exc)

    def _distrust(self) -> None:
        """Bytes of this blob did not check out: a mirror may not serve it again (mirrored.py)."""
        distrust = getattr(self.client, "distrust", None)
        if distrust is not None:
            distrust(self.digest)

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
    resolution: Resolution | None = None,
    pinned: bool | None = None,
    verify: bool = True,
) -> OciBlobSource | ZstdSeekableSource:
    """Resolve *ref* once, pin the blob digest and return a source reading it.

    *layer*/*blob*/*platform* override the same fields of *options*; *env*
    replaces ``os.environ`` for credential look-ups; ``check_magic=False``
    skips the superblock check (extra devices of a multi-device image); ``resolution``: what
    resolving *ref* gave already (the layers of one image: no manifest request per layer).  A
    ``+zstd`` layer is served decompressed through its zstd seek table (``zstdsource.py``).
    With a trusted dm-verity root hash (``verity.roothash=``, or the layer's annotation when the
    manifest was resolved by digest: *pinned*, default: *ref* has a digest) every block is checked
    (``verity/source.py``) and only verified chunks are cached.  ``verify=False`` (NBD mode: the
    kernel's dm-verity checks) returns the raw blob with the choice in ``.verity``."""
    options = options_with(options, layer=layer, blob=blob, platform=platform)
    if isinstance(ref, str):
        ref = parse_reference(ref)
    if pinned is None:
        pinned = ref.digest is not None
    client = MirroredClient(ref, options, env=env)   # the origin alone unless mirrors are configured
    try:
        res = resolution if resolution is not None else await resolve(client, ref, options)
        index, desc = select_layer(res.manifest, layer=options.layer, blob=options.blob)
        tar_kind = layer_kind(desc.media_type)
        if tar_kind is None:
            check_layer_media_type(desc)
        src = OciBlobSource(
            client, digest=desc.digest, size=desc.size, media_type=desc.media_type,
            ref=res.ref, platform=res.platform, layer_index=index,
            manifest_digest=res.manifest_digest, options=options,
        )
        if options.cache is not None:
            await src.attach_disk_cache(options.cache or default_root(), options.cache_limit)
        what = f"{ref} layer {index} ({desc.digest})"
        if tar_kind is not None:
            check_tar = tar_choice(options.verity, options.verity_root, options.verity_offset,
                                   pinned=pinned or options.blob is not None, indexed=options.tarindex is None,
                                   what=what, media_type=desc.media_type)
            choice = None
        else:
            choice, warning = options.verity_choice(annotations=desc.annotations, pinned=pinned, what=what)
            if warning:
                log.warning("%s", warning)
            if choice is not None and is_zstd_layer(desc.media_type):
                raise UsageError(f"{what}: dm-verity trees are appended to EROFS layers; this one is {desc.media_type}")
        if options.tarindex is not None:  # erofs-utils' oci.tarindex=/oci.zinfo=: an index made elsewhere
            from ..tarlayer.openlayer import open_prebuilt

            if tar_kind is None:
                raise UsageError(f"{what}: oci.tarindex is for tar layers, not {desc.media_type}")
            if options.verity != "off":
                log.info("%s: reads of the blob are not verified (oci.tarindex: no indexing pass here)", what)
            return await open_prebuilt(src, tar_kind, what=what, index_path=options.tarindex,
                                       zinfo_path=options.zinfo, memory_limit=options.memory_limit)
        if tar_kind is not None:  # served through an EROFS tar index, made once and cached
            from ..tarlayer.openlayer import open_tar_layer
            from ..tarlayer.store import digest_dir

            entry = digest_dir(options.cache or default_root(), desc.digest) if options.cache is not None else None
            return await open_tar_layer(src, tar_kind, what=what, digest=desc.digest, entry=entry,
                                        memory_limit=options.memory_limit, verify=check_tar)
        if is_zstd_layer(desc.media_type):  # random access through its seek table, or refused
            src = await open_zstd_layer(src, what)
        if choice is not None and not verify:
            src.verity = choice
        elif choice is not None:
            from ...verity.source import open_verified

            verified = await open_verified(src, choice.root, hash_offset=choice.hash_offset, name=what)
            src.set_gate(verified.accept)
            if getattr(src, "disk", None) is not None:  # blocks verified once are marked in the cache entry
                await trio.to_thread.run_sync(src.disk.use_marks, choice.root.hex())
            log.info("%s: every block verified against root hash %s (%s)", what, choice.root.hex(), choice.origin)
            src = verified
        if check_magic:  # on the decompressed bytes of a +zstd layer
            if src.size < EROFS_SUPER_OFFSET + 4:
                raise NotErofsError(f"{what}: {src.size} bytes, too small to be an EROFS image")
            check_erofs_magic(await src.read_at(0, EROFS_SUPER_OFFSET + 4), what)
        return src
    except BaseException:
        with trio.CancelScope(shield=True):
            await client.aclose()
        raise
