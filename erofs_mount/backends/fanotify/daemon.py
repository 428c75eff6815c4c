"""The fanotify-mode daemon (trio): open the source, make the metadata local, start the holder and
the guard, mount, then fill what the holder asks for until the mount goes.

    mount_main(spec, mountpoint, ready)      a new mount
    reattach_main(record, ready)             a new daemon for a live mount whose daemon died

The sparse file is the source's entry in the persistent blob cache (sources/diskcache.py): an
EROFS blob's own digest entry (shared with FUSE and NBD mounts of the same blob), or a derived key
for a tar layer's index+tar image and for a local file.  What the kernel reads without raising an
event (erofs/metaranges.py) is fetched before mount(2); everything else on demand.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import trio

from ...erofs.metaranges import coalesce, metadata_ranges
from ...errors import ErofsMountError, UsageError
from ...publish import Publisher, source_stats
from .. import kmount
from . import link, record
from .filler import Filler, verify_entry

log = logging.getLogger("erofs_mount.fanotify")
PREFETCH_GAP = 64 << 10          # metadata ranges closer than this are fetched as one
PUBLISH_INTERVAL = 2.0
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _local_key(path: str) -> str:
    st = os.stat(path)
    ident = f"erofs-mount fanotify local 1\0{os.path.realpath(path)}\0{st.st_dev}\0{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}"
    return "sha256:" + hashlib.sha256(ident.encode()).hexdigest()


def _verity_choice(spec: dict, what: str):
    """A local image's trusted root hash (-o verity.roothash=, kept in the spec's option dict)."""
    from ...verity.options import choose, parse_mode, parse_offset

    o = spec.get("oci") or {}
    off = o.get("verity.hashoffset")
    choice, _ = choose(parse_mode("verity", o.get("verity")), o.get("verity.roothash"),
                       None if off is None else parse_offset("verity.hashoffset", off), what=what)
    return choice


def blob_size(source) -> int:
    """The size of what the sparse file mirrors: the whole blob (image + appended tree) for a
    verified source, whose ``size`` is the image alone (the kernel reads no further)."""
    inner = getattr(source, "inner", None)
    return inner.size if inner is not None and hasattr(source, "read_partial") else source.size


async def open_source(spec: dict):
    """(source, cache key) for a record's source description."""
    from ...sources.tarlayer import local_kind

    if spec["kind"] == "local":
        path = spec["source"]
        tar = local_kind(path)      # a missing file: LocalSource.open says so
        if tar is not None:
            from ...sources.tarlayer.openlayer import open_local_layer

            return await open_local_layer(path, tar), _local_key(path)
        from ...sources.local import LocalSource

        src = LocalSource.open(path)
        choice = _verity_choice(spec, path)
        if choice is not None:
            from ...verity.source import open_verified

            try:
                src = await open_verified(src, choice.root, hash_offset=choice.hash_offset, name=path)
            except BaseException:
                src.close()
                raise
            log.info("%s: every block verified against root hash %s before it is written", path, choice.root.hex())
        return src, _local_key(path)
    import dataclasses

    if spec["kind"] == "s3":   # the sparse file is the object's cache entry, written by this daemon alone
        from ...sources.s3.options import S3Options
        from ...sources.s3.source import open_s3_source

        options = S3Options.from_mount_options(spec["oci"])
        options = dataclasses.replace(options, transfer=dataclasses.replace(options.transfer, cache=None))
        src = await open_s3_source(spec["source"], options=options, check_magic=False)
        return src, src.digest

    from ...sources.oci.blob import open_oci_source
    from ...sources.oci.manifest import select_layer
    from ...sources.oci.options import OciOptions
    from ...sources.oci.resolve import inspect_oci
    from ...sources.tarlayer.kinds import layer_kind

    options = OciOptions.from_mount_options(spec["oci"])
    res = await inspect_oci(spec["source"], options=options)
    _index, desc = select_layer(res.manifest, layer=options.layer, blob=options.blob)
    plain = layer_kind(desc.media_type) is None
    if plain:   # an EROFS blob: the sparse file is its cache entry, written by this daemon alone
        options = dataclasses.replace(options, cache=None)
    # an EROFS blob's superblock is checked from the sparse file (a complete one asks the registry nothing)
    src = await open_oci_source(spec["source"], options=options, resolution=res, check_magic=not plain)
    digest = src.digest
    if not (plain and hasattr(src, "attach_disk_cache")):   # a tar layer's index+tar, a +zstd layer decoded
        digest = "sha256:" + hashlib.sha256(f"erofs-mount fanotify derived 1\0{digest}".encode()).hexdigest()
    return src, digest


def _source_requests(source) -> str:
    st = source_stats(source)
    return f"{st.get('requests', 0)} source requests, {st.get('bytes_fetched', 0)} bytes"


def _spawn(module: str, args: list[str], log_fd: int) -> subprocess.Popen:
    """The holder or the guard: its own session (a signal to the daemon's group does not reach it),
    stderr to the daemon's log; returns once it printed "ready"."""
    proc = subprocess.Popen([sys.executable, "-m", f"erofs_mount.backends.fanotify.{module}", *args],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log_fd,
                            start_new_session=True, close_fds=True,
                            env={**os.environ, "PYTHONPATH": _PACKAGE_ROOT})
    line = proc.stdout.readline().decode(errors="replace").strip()
    proc.stdout.close()
    if line != "ready":
        proc.wait(10)
        raise ErofsMountError(f"fanotify {module}: {line.removeprefix('error ') or 'exited before it was ready'}",
                              errno=5)
    return proc


def _connect(sock_path: str) -> tuple[socket.socket, int]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.settimeout(30)
    s.connect(sock_path)
    _msg, fds, _flags, _addr = socket.recv_fds(s, 1, 1)
    if not fds:
        raise ErofsMountError("fanotify holder: no file descriptor received", errno=71)
    s.settimeout(None)
    return s, fds[0]


async def _serve_link(sock: socket.socket, filler: Filler, counts: dict, mountpoint: str, data_path: str) -> None:
    """FILL in, DONE out, each FILL in its own task (concurrent fills of one window coalesce)."""
    tsock = trio.socket.from_stdlib_socket(sock)
    stream = trio.SocketStream(tsock)
    send_lock = trio.Lock()
    decoder = link.Decoder()

    async def handle(req: link.Fill) -> None:
        err = 0
        try:
            await filler.ensure(req.offset, req.offset + req.count)
        except Exception as exc:  # noqa: BLE001 - the reader gets EIO, the log one line
            log.error("fill %d+%d: %s", req.offset, req.count, exc)
            counts["denied"] += 1
            err = 5
        counts["answered"] += 1
        async with send_lock:
            await stream.send_all(link.done(req.id, err))

    async with trio.open_nursery() as nursery:
        while True:
            data = await stream.receive_some(64 * 1024)
            if not data:
                if not record.mounted(mountpoint, data_path):
                    log.info("the holder closed the link: the mount is gone")
                    nursery.cancel_scope.cancel()
                    return
                raise ErofsMountError("the fanotify holder closed the link", errno=5)
            for req in decoder.feed(data):
                if isinstance(req, link.Fill):
                    counts["requests"] += 1
                    nursery.start_soon(handle, req)


async def _watch(mountpoint: str, data: str, filler: Filler, doc: dict, counts: dict, store) -> None:
    """Publish the record with the figures (the shared Publisher); return when the mount is gone."""
    def snapshot() -> dict:
        doc["stats"] = {**filler.stats, **counts, "size": filler.size, "bytes_local": store.present_bytes,
                        "source": source_stats(filler.source)}
        return doc
    publisher = Publisher(record.path(mountpoint), snapshot)
    while True:
        publisher.publish()
        if not record.mounted(mountpoint, data):
            log.info("%s is no longer mounted", mountpoint)
            return
        await trio.sleep(PUBLISH_INTERVAL)


async def _prefetch(source, filler: Filler) -> int:
    """Make every metabuf range (erofs/metaranges.py) local; returns their bytes.

    A remote source's walk reads the sparse file: each directory level's ranges are filled through
    ``filler`` (whole windows, written once) before the walk reads them, so every byte crosses the
    network once and the walk costs one round trip per level that is not local yet.  A local
    source is walked directly (its reads are cheap) and filled at the end."""
    from ...erofs.image import Image
    from ...sources.bridge import SyncReadAt

    token = trio.lowlevel.current_trio_token()
    limit = trio.CapacityLimiter(8)
    store = filler.store

    async def one(off, length):
        async with limit:
            await filler.ensure(off, off + length)

    async def fill(ranges) -> None:
        async with trio.open_nursery() as nursery:
            for off, length in coalesce(ranges, PREFETCH_GAP):
                nursery.start_soon(one, off, length)

    def read_local(off: int, length: int) -> bytes:
        end = min(off + length, source.size)
        if not store.has(off, end):
            trio.from_thread.run(filler.ensure, off, end, trio_token=token)
        return store.read(off, end)

    def find():
        if hasattr(source, "pread"):
            img = Image(SyncReadAt(source, token).read_at, size=source.size)
            hint = None
        else:
            img = Image(read_local, size=source.size)
            hint = lambda r: trio.from_thread.run(fill, list(r), trio_token=token)  # noqa: E731
        return metadata_ranges(img, align=max(4096, img.block_size), prefetch=hint)
    ranges = coalesce(await trio.to_thread.run_sync(find), PREFETCH_GAP)
    await fill(ranges)
    return sum(n for _o, n in ranges)


async def _run(doc: dict, source, store, sock, ready, *, mount: bool) -> None:
    mountpoint, data = doc["mountpoint"], doc["data"]
    filler = Filler(source, store, window=doc["window"], verify=doc["key"] == getattr(source, "digest", None))
    counts = {"requests": 0, "answered": 0, "denied": 0}
    async with trio.open_nursery() as nursery:
        await nursery.start(filler.run)
        if sock is not None:
            nursery.start_soon(_serve_link, sock, filler, counts, mountpoint, data)
        if mount:
            # the regular file itself as the source (Linux 6.12+: fs/erofs/super.c erofs_fc_get_tree
            # opens fc->source with filp_open when it is no block device); util-linux mount would set
            # up a loop device instead, whose I/O raises no events
            spec = doc["spec"]
            await trio.to_thread.run_sync(kmount.mount, data, mountpoint, "erofs", spec.get("mount_flags", 0),
                                          spec.get("mount_data") or None)
        doc["pids"]["daemon"] = os.getpid()
        record.write(doc)
        ready.ok()
        log.info("serving %s at %s (%s)", doc["source"], mountpoint, "holder link" if sock else "complete: no events")
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async def on_signal():
                async for _ in signals:
                    log.info("signal: exiting")
                    nursery.cancel_scope.cancel()
            nursery.start_soon(on_signal)
            await _watch(mountpoint, data, filler, doc, counts, store)
            nursery.cancel_scope.cancel()


async def mount_main(spec: dict, mountpoint: str, window: int, ready) -> int:
    from ...sources.diskcache import DiskCache, enforce_limit
    from ...sources.oci.options import OciOptions

    source, key = await open_source(spec)
    if spec["kind"] == "s3":   # a reattach reopens exactly this object: its ETag, its version
        spec = {**spec, "oci": {**spec["oci"], **source.pins()}}
    if spec["kind"] == "oci":   # a reattach reopens exactly this blob, whatever the tag says by then
        oci = {k: v for k, v in spec["oci"].items() if k != "oci.layer"}
        spec = {**spec, "source": str(source.ref),
                "oci": {**oci, "oci.blob": source.digest, "oci.platform": source.platform}}
    procs: list[subprocess.Popen] = []
    try:
        root = spec["cache_root"]
        store = await trio.to_thread.run_sync(lambda: DiskCache.open(root, key, blob_size(source)))
        limit = OciOptions.from_mount_options({k: v for k, v in spec["oci"].items() if k == "cache_limit"}).cache_limit
        await trio.to_thread.run_sync(lambda: enforce_limit(root, limit, keep=store.path))  # in-use entries stay
        data = os.path.join(store.path, "data")
        doc = record.new(spec, mountpoint, data, key, blob_size(source), window)
        keepers = not store.complete
        if keepers:   # holder and guard start while the metadata is fetched (this daemon's fd predates the mark)
            def spawn_keepers() -> None:
                procs.append(_spawn("holder", [data, doc["socket"], doc["lock"], mountpoint], sys.stderr.fileno()))
                procs.append(_spawn("guard", [data, doc["lock"], mountpoint], sys.stderr.fileno()))
            t0 = time.monotonic()
            pre = Filler(source, store, window=window, readahead=0)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.to_thread.run_sync, spawn_keepers)
                nbytes = await _prefetch(source, pre)
            log.info("metadata made local: %d bytes, %d window fetches (%s), %.2f s", nbytes, pre.stats["fetches"],
                     _source_requests(source), time.monotonic() - t0)
        if store.complete:   # no metadata walk: check the superblock here
            from ...sources.oci.manifest import EROFS_SUPER_OFFSET, check_erofs_magic

            head = await trio.to_thread.run_sync(store.read, 0, min(source.size, EROFS_SUPER_OFFSET + 4))
            check_erofs_magic(head, spec["source"])
        if store.complete and key == getattr(source, "digest", None) and not store.verified:
            if not await trio.to_thread.run_sync(verify_entry, store):   # the whole blob came with the metadata
                raise ErofsMountError(f"{spec['source']}: the blob does not match its digest {key}", errno=5)
        sock = None
        if keepers:
            doc["pids"].update(holder=procs[0].pid, guard=procs[1].pid)
            sock, received = await trio.to_thread.run_sync(_connect, doc["socket"])
            os.close(received)        # this daemon's own fd was opened before the mark already
        await _run(doc, source, store, sock, ready, mount=True)
    except BaseException:
        if ready.reported is None:
            for p in procs:
                p.terminate()
        raise
    finally:
        with trio.CancelScope(shield=True):
            await source.aclose()
    record.remove(mountpoint)
    return 0


async def reattach_main(doc: dict, ready) -> int:
    from ...sources.diskcache import DiskCache

    if not doc.get("pids", {}).get("holder"):
        raise UsageError(f"{doc['mountpoint']}: its image was complete when mounted: nothing to reattach")
    sock, wfd = _connect(doc["socket"])
    source, key = await open_source(doc["spec"])
    try:
        size = blob_size(source)
        if key != doc["key"] or size != doc["size"]:   # never write other bytes into the mounted file
            raise ErofsMountError(f"{doc['mountpoint']}: the source now gives {key} ({size} bytes), the "
                                  f"mount serves {doc['key']} ({doc['size']} bytes): not reattached", errno=5)
        store = await trio.to_thread.run_sync(lambda: DiskCache.open(doc["spec"]["cache_root"], key, size,
                                                                     data_fd=wfd))
        os.close(wfd)
        doc["daemons"] = doc.get("daemons", 1) + 1
        last, carried = doc.get("stats") or {}, doc.get("carried") or {}
        last_source = last.get("source") or {}
        # totals since the mount; a source's keys only for a verified one (status shows verity=off else)
        doc["carried"] = {**{k: int(carried.get(k, 0)) + int(last.get(k, 0)) for k in record.CARRIED_KEYS},
                          **{k: int(carried.get(k, 0)) + int(last_source.get(k, 0))
                             for k in record.CARRIED_SOURCE_KEYS if k in last_source or k in carried}}
        await _run(doc, source, store, sock, ready, mount=False)
    finally:
        with trio.CancelScope(shield=True):
            await source.aclose()
    record.remove(doc["mountpoint"])
    return 0
