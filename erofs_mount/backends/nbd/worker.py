"""The NBD daemon's async body (runs inside ``trio.run`` in the detached process).

``mount_main``: open the source, claim an index, write the record, CONNECT, serve,
mount, set autoclear, report ready, serve until DISC/EOF, clean up.
``reattach_main``: reopen the source from the record, RECONFIGURE with a new socket,
report ready, serve.  On any failure before "ready" everything is undone: device
disconnected, record removed, daemon gone.
"""

from __future__ import annotations

import functools
import errno as _errno
import logging
import os
import select
import socket
import struct
from dataclasses import dataclass
from typing import Any

import trio

from ...daemon import Readiness
from ...errors import ErofsMountError, NotErofsError, leaf_error
from .. import kmount
from . import ioctl, netlink, state, sysfs
from .config import NbdOptions
from .publish import base_document, serve_published
from .source import (open_source, pinned_record, pinned_s3_record, record_for_oci, record_for_s3,
                     verity_from_record, with_verity)
from .recovery import OciLayerRecord, Record, S3ObjectRecord, describe, record_path

log = logging.getLogger("erofs_mount.nbd")

EROFS_SUPER_OFFSET = 1024
EROFS_SUPER_MAGIC_V1 = 0xE0F5E1E2


def export_geometry(sb: bytes, size: int, block_size: int | None) -> tuple[int, int]:
    """(block size, export size) from the superblock: 4096 unless the image's is smaller;
    the export is the source's real size rounded up to the block size."""
    if len(sb) < EROFS_SUPER_OFFSET + 16:
        raise NotErofsError(f"the source is too small for an EROFS image ({size} bytes)")
    magic, _csum, _compat, blkszbits = struct.unpack_from("<IIIB", sb, EROFS_SUPER_OFFSET)
    if magic != EROFS_SUPER_MAGIC_V1:
        raise NotErofsError(f"not an EROFS image (magic {magic:#010x} at offset 1024)")
    if not 9 <= blkszbits <= 16:
        raise NotErofsError(f"EROFS superblock: bad blkszbits {blkszbits}")
    bs = block_size or min(4096, 1 << blkszbits)
    return bs, -(-size // bs) * bs


def _mount_syscall(device: str, mountpoint: str, flags: int, data: str) -> None:
    kmount.mount(device, mountpoint, "erofs", flags, data)


def _queue_attr(index: int, name: str, value: int) -> None:
    try:
        with open(f"/sys/block/nbd{index}/queue/{name}", "w") as f:
            f.write(str(value))
    except OSError as exc:
        log.warning("nbd%d: cannot set queue/%s: %s", index, name, exc)


def tune_queue(index: int, opts: NbdOptions) -> None:
    """io_timeout: with NBD TIMEOUT 0 it only decides how soon requests caught by a dead daemon
    are resent after a reattach (nbd_xmit_timeout requeues them once the socket changed);
    read_ahead_kb: bigger sequential requests."""
    if opts.io_timeout > 0:
        _queue_attr(index, "io_timeout", opts.io_timeout * 1000)
    if opts.read_ahead_kb > 0:
        _queue_attr(index, "read_ahead_kb", opts.read_ahead_kb)
        try:  # the block layer splits at max_sectors_kb (128): let a read-ahead be one request
            with open(f"/sys/block/nbd{index}/queue/max_hw_sectors_kb") as f:
                hw = int(f.read())
        except (OSError, ValueError):
            hw = 0
        if hw:
            _queue_attr(index, "max_sectors_kb", min(hw, max(128, opts.read_ahead_kb)))


def _candidates(opts: NbdOptions) -> list[int]:
    if opts.index is not None:
        return [opts.index]
    free = sysfs.free_indexes()
    nxt = max(sysfs.indexes(), default=-1) + 1
    return (free + [nxt + i for i in range(4)])[:16]  # an index above nbds_max creates the device


def _connect_netlink(opts: NbdOptions, record: Record, kernel_fd: int, size: int, bs: int) -> tuple[int, str]:
    """Under the allocation lock: pick an index, write its record, CONNECT with it as identifier."""
    with state.allocation_lock(opts.run_dir):
        last: ErofsMountError | None = None
        for idx in _candidates(opts):
            ident = record_path(idx, opts.run_dir)
            if state.daemon_alive(state.pid_path(ident)):
                continue
            state.write_record(ident, record)
            try:
                got = netlink.connect(kernel_fd, size_bytes=size, block_size=bs, identifier=ident, index=idx,
                                      dead_conn_timeout=opts.dead_conn_timeout)
            except ErofsMountError as exc:
                state.remove_quietly(ident)
                if exc.errno == _errno.EBUSY and opts.index is None:
                    last = exc
                    continue
                raise
            return got, ident
        if opts.index is not None:
            raise ErofsMountError(f"/dev/nbd{opts.index} is busy", errno=_errno.EBUSY)
        raise last or ErofsMountError("no free nbd device", errno=_errno.EBUSY)


def _connect_ioctl(opts: NbdOptions, record: Record, kernel_fd: int, size: int, bs: int) -> tuple[int, str, int]:
    with state.allocation_lock(opts.run_dir):
        for idx in _candidates(opts):
            if not os.path.exists(sysfs.device_path(idx)) and not os.path.isdir(f"/sys/block/nbd{idx}"):
                continue
            ident = record_path(idx, opts.run_dir)
            if sysfs.in_use(idx) or state.daemon_alive(state.pid_path(ident)):
                continue
            sysfs.ensure_device_node(idx)
            nbd_fd = ioctl.open_device(idx)
            try:
                ioctl.configure(nbd_fd, kernel_fd, size_bytes=size, block_size=bs)
            except ErofsMountError as exc:
                os.close(nbd_fd)
                if exc.errno == _errno.EBUSY and opts.index is None:
                    continue
                raise
            state.write_record(ident, _with_option(record, "mode", "ioctl"))
            return idx, ident, nbd_fd
    raise ErofsMountError("no free nbd device", errno=_errno.EBUSY)


def _with_option(record: Record, key: str, value: str) -> Record:
    from dataclasses import replace

    return replace(record, options=tuple(o for o in record.options if o[0] != key) + ((key, value),))


async def _wait_for(predicate, what: str, timeout: float) -> None:
    with trio.move_on_after(timeout) as scope:
        while not predicate():
            await trio.sleep(0.02)
    if scope.cancelled_caught:
        raise ErofsMountError(f"timed out waiting for {what}", errno=_errno.ETIMEDOUT)


async def _finish(stats, index: int, ident: str, pidlock: state.PidLock) -> int:
    """After the connection ended: drop the record only when the device is really gone."""
    gone = stats.end == "disconnect" or sysfs.backend(index) != ident or sysfs.size_bytes(index) == 0
    if stats.end != "disconnect" and not gone:
        await trio.sleep(0.5)  # a DISCONNECT in progress clears sysfs a moment later
        gone = sysfs.backend(index) != ident or sysfs.size_bytes(index) == 0
    if gone:
        state.remove_quietly(ident, state.stats_path(ident))
        log.info("nbd%d: disconnected (%s); record %s removed", index, stats.end, ident)
    else:
        log.warning("nbd%d: connection lost (%s) but the device is still configured; record kept for --reattach",
                    index, stats.end)
    pidlock.release(remove=gone)
    return 0


@dataclass(frozen=True)
class OciTarget:
    """A registry layer to mount: resolved (and its digest pinned) inside the daemon."""

    ref: str
    options: Any  # sources.oci.options.OciOptions


@dataclass(frozen=True)
class S3Target:
    """An S3 object to mount: pinned (ETag, version) inside the daemon."""

    source: str
    options: Any  # sources.s3.options.S3Options


async def _open_target(target: Record | OciTarget | S3Target) -> tuple[Any, Record]:
    if isinstance(target, S3Target):
        from ...sources.s3.source import open_s3_source

        src = await open_s3_source(target.source, options=target.options, verify=False)
        return src, record_for_s3(src)
    if isinstance(target, OciTarget):
        from ...sources.oci.blob import open_oci_source

        src = await open_oci_source(target.ref, options=target.options, verify=False)
        # src.ref is pinned to the manifest digest (tag kept for display): with the blob digest, a
        # reattach resolves exactly this image even after the tag moved
        return src, record_for_oci(str(src.ref), src.platform, src.digest, target.options)
    return await open_source(target), target


async def _check_verity(source: Any, record: Record, choice: Any = None) -> tuple[Record, Any]:
    """With a trusted root hash (the source's annotation choice, or the record's lines): the tree's
    superblock, upper levels and block 0 checked now (a wrong root hash is one line, before any
    device exists), the source's cache gate set (only verified chunks cached), and the record with
    the root hash.  (record, the tree's TreeState or None)."""
    from ...verity.source import open_verified

    choice = choice or getattr(source, "verity", None) or verity_from_record(record)
    if choice is None:
        return record, None
    checked = await open_verified(source, choice.root, hash_offset=choice.hash_offset, name=describe(record))
    if hasattr(source, "set_gate"):
        source.set_gate(checked.accept)
    st = checked.state
    log.info("%s: dm-verity root hash %s (%s), tree at byte %d", describe(record), choice.root.hex(), choice.origin,
             st.hash_offset)
    return with_verity(record, choice.root, st.hash_offset), st


def _verity_device(index: int, device: str, tree: Any) -> str:
    from ...verity import dm

    return dm.create_verity(dm.name_for(index), device, tree.p, tree.geo.hash_start, tree.root)


def _remove_verity(index: int) -> None:
    from ...verity import dm

    dm.remove(dm.name_for(index), quiet=True)


async def mount_main(target: Record | OciTarget, mountpoint: str, opts: NbdOptions, mode: str,
                     ready: Readiness) -> int:
    try:
        source, record = await _open_target(target)
    except BaseException as exc:
        _report(ready, exc)
        raise
    try:
        record, tree = await _check_verity(source, record)
    except BaseException as exc:
        await source.aclose()
        _report(ready, exc)
        raise
    srv_sock, kernel_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    index, ident, nbd_fd, connected = -1, "", -1, False
    pidlock: state.PidLock | None = None
    try:
        head = await source.read_at(0, min(source.size, 4096))
        bs, export_size = export_geometry(head, source.size, opts.block_size)
        if mode == "netlink":
            index, ident = await trio.to_thread.run_sync(
                _connect_netlink, opts, record, kernel_sock.fileno(), export_size, bs)
        else:
            log.warning("nbd: the 'nbd' netlink family is not used: ioctl mode, reattach unavailable in ioctl mode")
            index, ident, nbd_fd = await trio.to_thread.run_sync(
                _connect_ioctl, opts, record, kernel_sock.fileno(), export_size, bs)
        connected = True
        kernel_sock.close()
        pidlock = state.PidLock(state.pid_path(ident))
        pidlock.acquire()
        log.info("nbd%d: %s connected (%s mode, %d bytes, block size %d, identifier %s)",
                 index, describe(record), mode, export_size, bs, ident)
        tune_queue(index, opts)
        device = sysfs.ensure_device_node(index)
        async with trio.open_nursery() as nursery:
            if nbd_fd >= 0:
                nursery.start_soon(trio.to_thread.run_sync, ioctl.do_it, nbd_fd)
            stats = await nursery.start(functools.partial(
                serve_published, trio.socket.from_stdlib_socket(srv_sock), source,
                base_document(index, record, source, None), state.stats_path(ident),
                export_size=export_size, zero_copy=opts.zero_copy))
            try:
                await _wait_for(lambda: sysfs.size_bytes(index) > 0, f"/dev/nbd{index} to answer", opts.ready_timeout)
                if tree is not None:  # the kernel checks every block: the filesystem goes on the dm device
                    device = await trio.to_thread.run_sync(_verity_device, index, device, tree)
                    log.info("nbd%d: dm-verity device %s", index, device)
                with trio.fail_after(opts.ready_timeout):
                    await trio.to_thread.run_sync(_mount_syscall, device, mountpoint, opts.mount_flags,
                                                  opts.mount_data, abandon_on_cancel=True)
                if mode == "netlink":
                    await trio.to_thread.run_sync(netlink.set_autoclear, index, ident)
            except BaseException:
                if tree is not None:
                    await trio.to_thread.run_sync(_remove_verity, index)
                await trio.to_thread.run_sync(_disconnect_any, index, mode)
                raise
            log.info("nbd%d: mounted on %s", index, mountpoint)
            ready.ok()
        return await _finish(stats, index, ident, pidlock)
    except BaseException as exc:
        if connected and not ready.reported:
            await trio.to_thread.run_sync(_disconnect_any, index, mode)
        if ident and not ready.reported:
            state.remove_quietly(ident, state.stats_path(ident))
            if pidlock:
                pidlock.release(remove=True)
        _report(ready, exc)
        raise
    finally:
        kernel_sock.close()
        srv_sock.close()
        if nbd_fd >= 0:
            os.close(nbd_fd)
        await source.aclose()


def _report(ready: Readiness, exc: BaseException) -> None:
    leaf = leaf_error(exc)
    if isinstance(leaf, ErofsMountError):
        ready.fail(str(leaf), leaf.errno)
    elif not isinstance(leaf, (KeyboardInterrupt, SystemExit, trio.Cancelled)):
        ready.fail(f"daemon failed: {type(leaf).__name__}: {leaf}")


def _disconnect_any(index: int, mode: str) -> None:
    try:
        if mode == "netlink":
            netlink.disconnect(index)
        else:
            ioctl.disconnect(index)
    except ErofsMountError as exc:
        log.warning("nbd%d: disconnect: %s", index, exc)


def _reconfigure_until_taken(index: int, ident: str, attempts: int = 40) -> socket.socket:
    """RECONFIGURE with a new socket; the kernel silently drops it while it still believes the
    old connection is alive (nbd_reconnect_socket finds no dead socket): we see EOF at once
    and try again a moment later."""
    for attempt in range(attempts):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            netlink.reconfigure(index, identifier=ident, sock_fd=theirs.fileno())
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        r, _, _ = select.select([ours], [], [], 0.02)  # a dropped socket is closed before the call returns
        if not r or ours.recv(1, socket.MSG_PEEK):
            return ours
        ours.close()
        log.info("nbd%d: the kernel dropped the new socket (old connection not dead yet), retry %d",
                 index, attempt + 1)
        select.select([], [], [], 0.25)
    raise ErofsMountError(f"/dev/nbd{index}: the kernel kept refusing the new connection", errno=_errno.EBUSY)


def _pin_layer_record(index: int, ident: str, record: OciLayerRecord, source: Any, previous: dict | None) -> Record:
    """An erofs-utils ``OCI_LAYER`` record names a tag, resolved again now as erofs-utils does
    (mount/main.c erofsmount_reattach re-runs the OCI layer lookup): warn when that gives another
    blob than the device was serving (known from the dead daemon's statistics file, if one of
    ours served it), then pin what we serve from now on (``OCI_NATIVE_BLOB``, same credentials)."""
    served = (previous or {}).get("digest")
    if served and served != source.digest:
        log.warning("nbd%d: %s now resolves to %s but the device was serving %s: the tag moved; "
                    "serving the new blob as erofs-utils would", index, describe(record), source.digest, served)
    elif not served:
        log.info("nbd%d: %s resolved to %s (the digest served before is unknown)", index, describe(record),
                 source.digest)
    pinned = pinned_record(record, source)
    state.write_record(ident, pinned)
    log.info("nbd%d: record %s rewritten as %s", index, ident, describe(pinned))
    return pinned


def reattach_size(index: int, device_size: int, export_size: int) -> int:
    """The size to serve on reattach.  A device smaller than the image is another image: refused.
    A larger one is erofs-utils' (mount/main.c connects every device with EROFSMOUNT_NBD_DISK_SIZE,
    8 EiB) or one whose image was padded: we serve the device's size, and reads past the image's
    end get zeros.  Safe: the kernel's erofs driver never asks for a byte past the blocks its
    superblock names, only block-device read-ahead may, and zeros there fail no reader (an error
    would fail a whole request that also holds the image's last bytes)."""
    if device_size and device_size < export_size:
        raise ErofsMountError(f"/dev/nbd{index} has {device_size} bytes but the source now gives {export_size}: "
                              "not the image this device was serving", errno=_errno.EINVAL)
    if device_size > export_size:
        log.info("nbd%d: the device has %d bytes, the image %d (a device connected by erofs-utils, or padded): "
                 "serving the device's size, reads past the image's end get zeros", index, device_size, export_size)
        return device_size
    return export_size


async def reattach_main(index: int, ident: str, record: Record, opts: NbdOptions, ready: Readiness,
                        rewrite: bool = False) -> int:
    """``rewrite``: the record was changed by ``--reattach -o oci.*``: written back once the
    source opened, so the next reattach (or the supervisor) reaches the registry the same way."""
    try:
        source = await open_source(record)
    except BaseException as exc:
        _report(ready, exc)
        raise
    pidlock = state.PidLock(state.pid_path(ident))
    try:
        pidlock.acquire()  # refuses while a live daemon serves the device
        # the dm-verity device stays over /dev/nbdN across the reattach; the cache gate is set again
        choice = verity_from_record(record)
        if choice is not None:
            record, _tree = await _check_verity(source, record, choice)
        head = await source.read_at(0, min(source.size, 4096))
        bs, export_size = export_geometry(head, source.size, opts.block_size)
        export_size = reattach_size(index, sysfs.size_bytes(index), export_size)
        previous = state.read_json(state.stats_path(ident))  # what the dead daemon published
        if isinstance(record, OciLayerRecord):
            record = _pin_layer_record(index, ident, record, source, previous)
        elif isinstance(record, S3ObjectRecord) and "s3.etag" not in dict(record.options):
            record = pinned_s3_record(record, source)   # erofs-utils pins nothing: the object as it is now
            state.write_record(ident, record)
            log.info("nbd%d: record %s pinned to ETag %s", index, ident, source.etag)
        elif rewrite:
            state.write_record(ident, record)
            log.info("nbd%d: record %s rewritten with the options given to --reattach", index, ident)
        sock = await trio.to_thread.run_sync(_reconfigure_until_taken, index, ident)
        tune_queue(index, opts)
        log.info("nbd%d: reattached to %s", index, describe(record))
        async with trio.open_nursery() as nursery:
            stats = await nursery.start(functools.partial(
                serve_published, trio.socket.from_stdlib_socket(sock), source,
                base_document(index, record, source, previous), state.stats_path(ident),
                export_size=export_size, zero_copy=opts.zero_copy))
            ready.ok()
        return await _finish(stats, index, ident, pidlock)
    except BaseException as exc:
        if not ready.reported:
            pidlock.release(remove=True)  # ours (we held its lock): a failed attempt leaves no file
            _report(ready, exc)
        raise
    finally:
        await source.aclose()
