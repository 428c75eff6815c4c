"""Opening a tar layer as an image: from the index cache when it holds one, else by one pass.

``open_tar_layer(blob, kind, what=…, digest=…, entry=…)``: ``blob`` is the layer as stored (a
registry blob or a local file), ``kind`` ``"tar"``/``"gzip"``/``"zstd"``, ``entry`` the cache
directory for its index files (``store.py``; None: keep nothing, index at every open).  A tar or
tar+gzip blob named by its ``digest`` (a registry's) gets a dm-verity tree made by the indexing
pass; ``verify``: every later read of the blob is checked against it (``verity/anchored.py``: the
digest covers the whole blob, not a ranged read of it).
``open_local_layer(path, kind)``: the same for a local file, cached under the default cache root.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile

import trio

from ...errors import CorruptedError, ErofsMountError, ImageError
from ...gzindex import from_zinfo, to_zinfo
from . import store
from .build import index_layer
from .gzreader import GzTarReader
from .source import TarLayerSource

log = logging.getLogger("erofs_mount.sources.tarlayer")


async def open_tar_layer(blob, kind: str, *, what: str, digest: str | None = None, entry: str | None = None,
                         memory_limit: int = 256 << 20, verify: bool = False) -> TarLayerSource:
    # a blob named by its digest (a registry's) keeps its tree, used or not (verity=off) by each mount;
    # a zstd layer's tar is read from disk after the pass, a local file is trusted as it is
    want_tree = digest is not None and kind in ("tar", "gzip")
    stored = None
    if entry is not None:
        stored = await trio.to_thread.run_sync(lambda: store.load(entry, kind=kind, source_size=blob.size,
                                                                  tree=want_tree))
    if stored is not None:
        log.info("%s: tar index from the cache (%s, %d bytes)", what, entry, len(stored.index))
        index, tar_size, tar_path, tree = stored.index, stored.tar_size, stored.tar_path, stored.tree
        gz = from_zinfo(stored.zinfo, compressed_size=blob.size, uncompressed_size=tar_size) if kind == "gzip" else None
        tmpdir = None
    else:
        tmpdir = None
        spill = None
        if kind == "zstd":     # one zstd frame cannot be entered in the middle: keep the stream itself
            if entry is None:
                tmpdir = tempfile.mkdtemp(prefix="erofs-mount-zstd-")
                log.info("%s: no cache: the decompressed tar is kept in %s while mounted", what, tmpdir)
        # a layer that does not check out (its digest, its gzip or tar structure) when a mirror may
        # have served it: once more, from the origin only
        mirrored = getattr(getattr(blob, "client", None), "has_mirrors", False)
        for attempt in (1, 2):
            spill = store.TarSpill(entry or tmpdir) if kind == "zstd" else None
            try:
                built = await index_layer(blob, kind, what=what, digest=digest, spill=spill, tree=want_tree)
                tar_path = spill.commit() if spill is not None else None
                break
            except (CorruptedError, ImageError) as exc:   # what the bytes say (UnsupportedError included)
                if spill is not None:
                    spill.discard()
                if attempt == 1 and mirrored:
                    log.warning("%s; reading it again from the origin", exc)
                    blob.forget(0, blob.size)   # drops what the caches hold; the mirrors are distrusted
                    continue
                _cleanup(tmpdir, entry)
                raise
            except BaseException:
                if spill is not None:
                    spill.discard()
                _cleanup(tmpdir, entry)
                raise
        index, tar_size, gz, tree = built.index, built.tar_size, built.gz, built.tree
        if entry is not None:
            zinfo = to_zinfo(gz) if gz is not None else None
            try:
                await trio.to_thread.run_sync(lambda: store.save(entry, kind=kind, source_size=blob.size, index=index,
                                                                 tar_size=tar_size, zinfo=zinfo, tree=tree))
            except OSError as exc:
                log.warning("%s: cannot keep the tar index in %s: %s", what, entry, exc.strerror)
    reads = blob
    if tree is not None and verify:
        from ...verity.anchored import open_anchored

        root, area = tree
        reads = await open_anchored(blob, root, area, name=what)
        log.info("%s: every read of the blob checked against the dm-verity tree its indexing made (root %s)",
                 what, root.hex())
    return _assemble(blob, kind, what, index, tar_size, gz, tar_path, tmpdir, memory_limit, reads=reads)


def _cleanup(tmpdir: str | None, entry: str | None) -> None:
    if tmpdir:
        shutil.rmtree(tmpdir, ignore_errors=True)
    if entry is not None:
        _remove_if_empty(entry)


def _remove_if_empty(entry: str) -> None:
    """A failed first pass leaves no directory of its own behind (a blob-cache entry keeps its files)."""
    try:
        os.rmdir(entry)
    except OSError:
        pass


def _assemble(blob, kind, what, index, tar_size, gz, tar_path, tmpdir, memory_limit, *, reads=None) -> TarLayerSource:
    """*reads*: what the tar's bytes are read through (the blob, or the blob checked by its tree)."""
    closers: tuple = ()
    reads = blob if reads is None else reads
    if kind == "tar":
        if blob.size < tar_size:
            raise ErofsMountError(f"{what}: the tar is {tar_size} bytes but the blob only {blob.size}")
        tar = _Prefix(reads, tar_size)
    elif kind == "gzip":
        tar = GzTarReader(reads, gz, what=what, cache_bytes=memory_limit // 4)
    else:
        from ..local import LocalSource

        tar = LocalSource.open(tar_path)
        if tmpdir:
            closers = (lambda: shutil.rmtree(tmpdir, ignore_errors=True),)
    return TarLayerSource(index, tar, kind=kind, what=what, inner=blob, closers=closers)


class _Prefix:
    """The first ``size`` bytes of a source (a plain tar's stream, without what follows it)."""

    def __init__(self, inner, size: int) -> None:
        self._inner = inner
        self.size = size

    async def read_at(self, offset: int, length: int) -> bytes:
        length = max(0, min(length, self.size - offset))
        return await self._inner.read_at(offset, length) if length else b""

    def read_cached(self, offset: int, length: int) -> bytes | None:
        """The source's own ``read_cached`` (bytes at hand, sync: a registry blob's memory cache),
        else None."""
        cached = getattr(self._inner, "read_cached", None)
        if cached is None:
            return None
        length = max(0, min(length, self.size - offset))
        return cached(offset, length) if length else b""

    def stats(self) -> dict:
        return dict(self._inner.stats()) if hasattr(self._inner, "stats") else {}

    async def aclose(self) -> None:
        """The blob is closed by TarLayerSource."""


async def open_local_layer(path: str, kind: str, *, cache_root: str | None = "") -> TarLayerSource:
    """A local tar / tar.gz / tar.zst file as an image; its index kept under ``cache_root``
    (``""``: the default cache root; None: nowhere)."""
    from ..diskcache import default_root
    from ..local import LocalSource

    src = LocalSource.open(path)
    try:
        entry = None
        if cache_root is not None:
            st = os.stat(path)
            entry = store.local_dir(cache_root or default_root(), path, st)
        return await open_tar_layer(src, kind, what=path, entry=entry)
    except BaseException:
        await src.aclose()
        raise


def prebuilt_tar_size(index: bytes, what: str) -> int:
    """The tar's size as an index made elsewhere records it: its extra device's blocks (erofs-utils
    ``--tar=i``: the tar is device 1, mapped right after the index), else the superblock's blocks past
    the index (our own layout: one device, index then tar)."""
    from ...erofs.layout import EROFS_DEVT_SLOT_SIZE
    from ...erofs.superblock import parse_device_table, parse_superblock

    try:
        sb = parse_superblock(index[:4096])
        if sb.extra_devices:
            table = index[sb.devt_slotoff * EROFS_DEVT_SLOT_SIZE:][:sb.extra_devices * EROFS_DEVT_SLOT_SIZE]
            dev = parse_device_table(sb, table)[0]
            if dev.uniaddr * sb.block_size != len(index):
                raise ErofsMountError(f"{what}: oci.tarindex maps its tar at block {dev.uniaddr}, not right after "
                                      f"the index ({len(index)} bytes)")
            return dev.blocks * sb.block_size
        return sb.blocks * sb.block_size - len(index)
    except ErofsMountError as exc:
        raise ErofsMountError(f"{what}: oci.tarindex: {exc}", errno=exc.errno) from None


async def open_prebuilt(blob, kind: str, *, what: str, index_path: str, zinfo_path: str | None,
                        memory_limit: int = 256 << 20) -> TarLayerSource:
    """``-o oci.tarindex=PATH[,oci.zinfo=PATH]`` (erofs-utils mount.erofs): an index made by
    ``mkfs.erofs --tar=i [--gzinfo]`` instead of our own pass; the device is the index followed by
    the uncompressed tar (mount/main.c erofsmount_tarindex_pread)."""
    from ...errors import UsageError

    def read(path: str, name: str) -> bytes:
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as exc:
            raise UsageError(f"{name}={path}: {exc.strerror}") from None

    if kind not in ("tar", "gzip"):
        raise UsageError(f"{what}: oci.tarindex applies to tar and tar+gzip layers, not a {kind} one")
    index = read(index_path, "oci.tarindex")
    if len(index) % 512:
        raise UsageError(f"oci.tarindex={index_path}: {len(index)} bytes, not a whole number of 512-byte blocks")
    tar_size = prebuilt_tar_size(index, what)
    gz = None
    if kind == "gzip":
        if zinfo_path is None:
            raise UsageError(f"{what} is a tar+gzip layer: oci.tarindex needs oci.zinfo (mkfs.erofs --gzinfo)")
        gz = from_zinfo(read(zinfo_path, "oci.zinfo"), compressed_size=blob.size, uncompressed_size=tar_size)
    log.info("%s: tar index %s%s (%d bytes of tar)", what, index_path, f" with {zinfo_path}" if gz else "", tar_size)
    return _assemble(blob, kind, what, index, tar_size, gz, None, None, memory_limit)
