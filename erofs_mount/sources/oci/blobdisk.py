"""The persistent-cache side of a blob source (``blob.py`` OciBlobSource mixes it in): reads the
cache answers before the network, writes of what arrived (in background tasks ``aclose`` waits for),
and the verified marks of the dm-verity gate.  The entry itself: ``sources/diskcache.py``."""

from __future__ import annotations

import logging

import trio

from ..cache import chunk_extent, clamp
from ..diskcache import DiskCache, enforce_limit

log = logging.getLogger("erofs_mount.sources.oci")


class DiskCacheMixin:
    """Needs ``disk``, ``size``, ``chunk_size``, ``digest``, ``accept``, ``_closed``,
    ``_disk_verifying``, ``_n``, ``_write_scopes`` and ``_distrust`` of the source."""

    def pread_cached(self, offset: int, length: int, *, nowait: bool = False) -> bytes | None:
        """Sync, from any thread: the bytes when the persistent cache holds every block of the range,
        else None (then ``read_at``).  A warm mount's reader (sources/bridge.py) reads them with one
        pread in its own thread instead of a round trip through the trio loop and another thread.
        ``nowait``: only what the page cache holds too (the FUSE daemon's inline path), else None."""
        disk = self.disk
        if disk is None or self._closed or self._disk_verifying:
            return None
        offset, length = clamp(offset, length, self.size)
        if length == 0:
            return b""
        try:
            if not disk.has(offset, offset + length):
                return None
            data = (disk.read_nowait if nowait else disk.read)(offset, offset + length)
        except (OSError, ValueError):
            return None
        if data is None:
            return None
        self._n["direct_reads"] += 1
        return data

    def verified_on_disk(self, offset: int, length: int) -> bool:
        """Whether the persistent cache marks [offset, offset+length) verified by the gate (verity)."""
        disk = self.disk
        try:
            return disk is not None and disk.marked(offset, offset + length)
        except OSError:
            return False

    def _on_disk(self, i: int) -> bool:
        disk = self.disk
        if disk is None:
            return False
        try:
            return disk.has(*chunk_extent(i, self.chunk_size, self.size))
        except OSError as exc:
            self._disk_failed(exc)
            return False

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

    async def _disk_read(self, start: int, end: int, chunks: list[tuple[int, int]]):
        """(the bytes, whether each chunk was marked verified) when the persistent cache holds
        [start, end), else None.  The marks are taken BEFORE the read (and again after it, in
        _gate): a block repaired and marked while the read ran must not vouch for the older bytes."""
        disk = self.disk
        if disk is None:
            return None
        try:
            if not disk.has(start, end):
                return None
            marked = [self.accept is not None and self.verified_on_disk(a, b - a) for a, b in chunks]
            return await trio.to_thread.run_sync(disk.read, start, end), marked
        except OSError as exc:
            self._disk_failed(exc)
            return None

    async def _disk_write(self, start: int, data, verified: bool = False) -> None:
        """*verified*: the chunk passed the verity gate (decided when it arrived): marked so."""
        disk = self.disk
        if disk is None:
            return
        try:
            # verified: the checked bytes replace whatever an unverified mount left there before marking
            n = await trio.to_thread.run_sync(lambda: disk.write(start, data, replace=verified))
            if verified:  # it passed the verity gate: marked so, the next read trusts it
                await trio.to_thread.run_sync(disk.mark, start, start + len(data))
            self._n["disk_bytes_written"] += n
            if n and disk.written // (256 << 20) != (disk.written - n) // (256 << 20):  # keep the root bounded
                await trio.to_thread.run_sync(lambda: enforce_limit(self._disk_root, self._disk_limit, keep=disk.path))
            if disk.complete and not disk.verified and not self._disk_verifying:
                self._disk_verifying = True
                try:
                    if not await trio.to_thread.run_sync(disk.verify):
                        self._distrust()
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
