"""FUSE mode: mount an image with pyfuse3, serve it until unmounted, and unmount it.

    mount(source, mountpoint, FuseOptions(...), foreground=False, devices=()) -> int
    unmount(mountpoint) -> int

``mount`` detaches (``erofs_mount.daemon.run_detached``) and returns 0 only
once the mounted filesystem answered a ``stat`` of its root; otherwise it
prints the daemon's one-line error and returns 1.  The daemon ends when the
mount goes away (``-u``, ``umount``, ``umount -l``, ``fusermount3 -u``) or on
SIGTERM/SIGINT/SIGHUP, which unmount first.  While it serves, the daemon publishes a statistics
document for ``erofs-mount status`` (``publish.Publisher``; read by ``status.status_entries``).

The seam for sources: the operations take an ``Image``; openers.py opens it (a local file or
block device, a tar layer, a registry layer or whole image read through ``sources.SyncReadAt``).
The request path is ops.py/dirops.py; what makes it fast is in accel/, switched by ``-o accel=``.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys
from dataclasses import replace
from typing import Iterable

from ...errors import ErofsMountError, UsageError
from .accel import decoder
from .accel.pagestore import STORE_MAX
from .accel.readahead import FETCHING, KERNEL_DEFAULT_KB, UNCACHED, blob_state, set_read_ahead_kb
from .config import PASSED_FLAGS, FuseOptions
from .fusermount import fusermount_mount, fusermount_unmount, unmount
from .mountinfo import find_mount
from .openers import local_opener, oci_opener, s3_opener
from .publish import Publisher

__all__ = ["FuseOptions", "PASSED_FLAGS", "mount", "mount_oci", "unmount"]

log = logging.getLogger("erofs_mount.fuse")

# mount(2) flags libfuse passes on to the kernel (lib/mount.c, mount_flags[]); ro is always added

# ---------------------------------------------------------------------- serving
def _check_mountpoint(mountpoint: str, opts: FuseOptions, is_root: bool) -> None:
    if not os.path.isdir(mountpoint):
        raise UsageError(f"{mountpoint}: mount point is not a directory")
    if not is_root and (opts.allow_other or opts.allow_root):
        try:
            with open("/etc/fuse.conf") as f:
                allowed = any(line.strip() == "user_allow_other" for line in f)
        except OSError:
            allowed = False
        if not allowed:
            raise UsageError("allow_other/allow_root for a non-root user needs 'user_allow_other' "
                             "in /etc/fuse.conf")


async def _serve(image, mountpoint: str, opts: FuseOptions, source: str, ready, *, inline: bool,
                 stats_source=None, dec=None, verified: bool = False) -> None:
    """*verified*: a verified local image served with a decoder process (_main)."""
    import pyfuse3
    import trio

    from .accel import busypoll, shim
    from .ops import ErofsOperations, OpsConfig

    is_root = os.geteuid() == 0
    dp = opts.resolved_default_permissions(is_root=is_root)
    acc = opts.accelerators
    log.info("accelerators: %s", acc)
    # inline: the sources honour inline.nowait() (local files, what a registry source keeps resident)
    config = OpsConfig(uid=opts.uid, gid=opts.gid, threads=opts.threads,
                       store_max=STORE_MAX if acc.on("pagestore") else 0, store_ahead=acc.on("storeahead"),
                       read_next=acc.on("readnext"))
    ops = ErofsOperations(image, config, enable_acl=dp, inline=inline and acc.on("inline"))
    ops.decoder = dec
    # a verified local image: the decoder process takes big READs of every file, not only compressed
    # ones (it hashes them on the other CPU), and 1 MiB READs make them big
    ops.decode_all = verified
    options = opts.libfuse_options(source, is_root=is_root)
    if is_root:
        target = mountpoint
    else:
        # mount through fusermount3 ourselves and hand libfuse the /dev/fuse descriptor: libfuse only
        # falls back to fusermount3 when it can open /dev/fuse itself, which fails where /dev/fuse
        # is 0600 (no udev); fusermount3 is setuid and opens it as root
        target = f"/dev/fd/{fusermount_mount(mountpoint, options)}"
    try:
        pyfuse3.init(ops, target, options)
    except RuntimeError as exc:
        if not is_root:
            fusermount_unmount(mountpoint)
        raise ErofsMountError(f"{mountpoint}: FUSE mount failed ({exc}; see the log)",
                              errno=errno.EPERM) from None
    ours = find_mount(mountpoint)  # our mount, to tell it from others stacked on the same path later
    log.info("mounted %s on %s (FUSE, mount id %s)", source, mountpoint, ours.mount_id if ours else "?")
    publisher = Publisher(source, mountpoint, stats_source)  # for `erofs-mount status`
    publisher.base["mount_id"] = ours.mount_id if ours else None
    try:
        async with trio.open_nursery() as nursery:
            async def signals() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
                    async for signum in sigs:
                        log.info("signal %s: unmounting %s", signal.Signals(signum).name, mountpoint)
                        pyfuse3.terminate()
                        return

            async def warm_read_ahead(st_dev: int) -> None:
                """Back to the kernel's window once every blob byte is local (checked each second)."""
                while blob_state(stats_source) == FETCHING:
                    await trio.sleep(1.0)
                why = set_read_ahead_kb(st_dev, KERNEL_DEFAULT_KB)
                log.info("%s", why or f"read-ahead of {mountpoint}: {KERNEL_DEFAULT_KB} KiB (the blob is local now)")

            async def probe() -> None:
                try:
                    st = await trio.to_thread.run_sync(os.stat, mountpoint, abandon_on_cancel=True)
                except OSError as exc:
                    ready.fail(f"{mountpoint}: the new mount does not answer: {exc.strerror}", exc.errno)
                    pyfuse3.terminate()
                    return
                if st.st_ino != pyfuse3.ROOT_INODE:
                    ready.fail(f"{mountpoint}: the mount point does not show the new mount")
                    pyfuse3.terminate()
                    return
                # big READs pay for compressed images, for verified ones (every block hashed) and for
                # sources whose every read crosses the bridge (registry blobs): fewer requests, each
                # crossing two threads.  A tar layer answered
                # inline (ResidentReader) keeps the kernel's 128 KiB: measured faster (0.51 vs 0.69 s
                # for a cold 100 MB sequential read, bench_tarlayer)
                # a registry blob still being fetched: big READs too, until its cache is complete
                big = image.sb.marks_compression or not inline or verified
                state = blob_state(stats_source) if opts.read_ahead_kb is None else None
                cold = state in (FETCHING, UNCACHED)
                kb = opts.resolved_read_ahead_kb(is_root=is_root, compressed=big or cold)
                if kb:
                    why = set_read_ahead_kb(st.st_dev, kb)
                    if why is None:
                        log.info("read-ahead of %s: %d KiB%s", mountpoint, kb, " while the blob is fetched" if cold else "")
                        if state == FETCHING and not big:   # back to the kernel's once the cache is complete
                            nursery.start_soon(warm_read_ahead, st.st_dev)
                    else:
                        log.warning("%s", why)
                log.info("ready: %s answers", mountpoint)
                ready.ok()

            async def serve() -> None:
                poller = busypoll.make(opts.poll_us) if acc.on("busypoll") else None
                if acc.on("shim") and not shim.install(poller):
                    log.warning("this pyfuse3 does not reach trio through pyfuse3.trio: "
                                "no busy polling, trio's own lock")
                    poller = None
                if poller is not None and config.store_ahead:
                    poller.idle = ops.ahead     # store the next file of a walk between requests
                try:
                    await pyfuse3.main()
                finally:
                    shim.uninstall()
                    if poller is not None:
                        log.info("busy polling (%d us): %d requests found while polling, %d waits slept",
                                 opts.poll_us, poller.hits, poller.sleeps)
                    log.info("page cache: %d small files stored at open (%d bytes), %d of them ahead of "
                             "their OPEN, %d read in a worker thread ahead of it; %d READ requests",
                             ops.pages.stores, ops.pages.store_bytes, ops.ahead_stores,
                             ops.readnext.taken if ops.readnext else 0, ops.read_requests)
                nursery.cancel_scope.cancel()

            if ops.readnext is not None:
                ops.readnext.nursery = nursery
            nursery.start_soon(signals)
            nursery.start_soon(probe)
            nursery.start_soon(serve)
            nursery.start_soon(publisher.run)
    except BaseException:
        log.exception("FUSE main loop failed")
        raise
    finally:
        publisher.remove()
        # a lost mount (umount, umount -l, fusermount3 -u) already detached; unmounting again is harmless
        top = find_mount(mountpoint)
        mounted = top is not None and ours is not None and top.mount_id == ours.mount_id
        log.info("session ended; %s", "unmounting" if mounted else "our mount is already gone")
        if mounted and not is_root:
            fusermount_unmount(mountpoint)  # libfuse does not unmount what it did not mount
        pyfuse3.close(unmount=mounted and is_root)


async def _main(opener, mountpoint: str, opts: FuseOptions, source: str, ready) -> None:
    image, closers, fds, stats_source, inline = await opener()
    dec = None
    try:
        log.info("image %s: block size %d, %d inodes, %d extra device(s)", source, image.block_size,
                 image.sb.inos, image.sb.extra_devices)
        # a verified image: every READ hashes its blocks, as costly as decompressing them
        from ...verity.source import VeritySource

        tree = stats_source.state if isinstance(stats_source, VeritySource) else None
        if fds and opts.accelerators.on("decoder"):  # forked now, before /dev/fuse is open
            dec = decoder.start(image, fds, opts.decoder, verified=tree)
        elif opts.decoder and opts.accelerators.on("decoder"):
            log.info("no decoder process: it serves local images only")
        await _serve(image, mountpoint, opts, source, ready, inline=inline, stats_source=stats_source, dec=dec,
                     verified=tree is not None and dec is not None)
    finally:
        if dec is not None:
            log.info("%s", dec.summary())
            dec.close()
        for close in closers:
            res = close()
            if hasattr(res, "__await__"):
                await res


def _worker(source: str, mountpoint: str, opts: FuseOptions, opener):
    def run(ready) -> int:
        import trio

        if opts.debug:
            logging.getLogger().setLevel(logging.DEBUG)
        is_root = os.geteuid() == 0
        _check_mountpoint(mountpoint, opts, is_root)
        opts.libfuse_options(source, is_root=is_root)  # option errors before touching the image
        profile = os.environ.get("EROFS_MOUNT_PROFILE")  # debugging aid: cProfile stats to this path
        if profile:
            import cProfile

            cProfile.runctx("trio.run(_main, opener, mountpoint, opts, source, ready)", globals(),
                            {"trio": trio, "opener": opener, "mountpoint": mountpoint, "opts": opts,
                             "source": source, "ready": ready, "_main": _main}, profile)
        else:
            trio.run(_main, opener, mountpoint, opts, source, ready)
        log.info("daemon for %s exits", mountpoint)
        return 0

    return run


def _add_file_log(path: str) -> None:
    try:
        os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
        handler = logging.FileHandler(path)
    except OSError as exc:
        log.warning("cannot log to %s: %s", path, exc.strerror)
        return
    handler.setFormatter(logging.Formatter("%(asctime)s erofs-mount[%(process)d] %(levelname)s %(message)s"))
    logging.getLogger().addHandler(handler)


def mount(source: str, mountpoint: str, opts: FuseOptions, *, foreground: bool = False,
          devices: Iterable[str] = (), verity=None) -> int:
    """Mount ``source`` on ``mountpoint`` with FUSE; 0 once live, else 1 after a one-line error.
    ``verity``: a verity/options.py Choice (every block checked against its root hash)."""
    foreground = foreground or opts.foreground
    mountpoint = os.path.abspath(mountpoint)
    source_abs = os.path.abspath(source)
    if opts.fsname is None:
        opts = replace(opts, fsname=source_abs)
    devices = tuple(os.path.abspath(d) for d in devices)
    return _run(source_abs, mountpoint, opts, local_opener(source_abs, devices, verity), foreground)


def mount_oci(ref: str, mountpoint: str, opts: FuseOptions, mount_options, *, foreground: bool = False) -> int:
    """Mount an OCI registry layer (``-o oci.layer=N`` / ``oci.blob=sha256:…``) with FUSE.

    ``mount_options`` is the CLI's ``options.MountOptions`` (its ``oci.*``, cache options and devices).
    The registry is resolved in the daemon, after detaching (connections do not survive a fork).
    """
    from ...opener import oci_options

    def prepare(devices):
        return ref, oci_opener(ref, oci_options(mount_options), devices)
    return _run_remote(prepare, mountpoint, opts, mount_options, foreground)


def mount_s3(source: str, mountpoint: str, opts: FuseOptions, mount_options, *, foreground: bool = False) -> int:
    """Mount an EROFS image kept as an S3 object (``s3://BUCKET/KEY``) with FUSE; the object is
    pinned (ETag, version) in the daemon, after detaching."""
    from ...opener import s3_options
    from ...sources.s3.options import parse_location

    def prepare(devices):
        loc = parse_location(source)
        return str(loc), s3_opener(loc, s3_options(mount_options), devices)
    return _run_remote(prepare, mountpoint, opts, mount_options, foreground)


def _run_remote(prepare, mountpoint: str, opts: FuseOptions, mount_options, foreground: bool) -> int:
    """``prepare(devices)`` -> (the source's name, its opener): option errors reported here, before
    detaching; the source itself is opened in the daemon."""
    devices = tuple(os.path.abspath(d) for d in getattr(mount_options, "devices", ()))
    try:
        name, opener = prepare(devices)
    except ErofsMountError as exc:
        print(f"erofs-mount: {exc}", file=sys.stderr)
        return 1
    if opts.fsname is None:
        opts = replace(opts, fsname=name)
    return _run(name, os.path.abspath(mountpoint), opts, opener, foreground or opts.foreground)


def _run(source: str, mountpoint: str, opts: FuseOptions, opener, foreground: bool) -> int:
    from ... import daemon

    log_file = opts.log_file or daemon.log_path("fuse")
    worker = _worker(source, mountpoint, opts, opener)
    try:
        if foreground:
            def fg(ready):
                _add_file_log(log_file)
                return worker(ready)
            return daemon.run_detached(fg, log_file=log_file, foreground=True)
        return daemon.run_detached(worker, log_file=log_file)
    except ErofsMountError as exc:
        print(f"erofs-mount: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"erofs-mount: {exc.filename or log_file}: {exc.strerror}", file=sys.stderr)
        return 1


# ---------------------------------------------------------------------- test/debug entry point
def main(argv: list[str] | None = None) -> int:
    """``python -m erofs_mount.backends.fuse.lifecycle [-f] [-o k=v,...] [--device D] IMAGE MNT`` or ``-u MNT``."""
    p = argparse.ArgumentParser(prog="erofs_mount.backends.fuse.lifecycle")
    p.add_argument("-u", "--unmount", action="store_true")
    p.add_argument("-z", "--lazy", action="store_true")
    p.add_argument("-f", "--foreground", action="store_true")
    p.add_argument("-o", dest="opts", action="append", default=[])
    p.add_argument("--device", action="append", default=[])
    p.add_argument("--log-file")
    p.add_argument("args", nargs="+")
    a = p.parse_args(argv)
    if a.unmount:
        return unmount(a.args[0], lazy=a.lazy)
    if len(a.args) != 2:
        p.error("IMAGE and MNT needed")
    flags, fuse = [], {}
    for text in a.opts:
        for item in text.split(","):
            key, eq, value = item.partition("=")
            if key in ("ro", ""):
                continue
            if key == "no_default_permissions":
                fuse["_ndp"] = ""
            elif key in PASSED_FLAGS:
                flags.append(key)
            else:
                fuse[key] = value
    ndp = fuse.pop("_ndp", None) is not None
    try:
        opts = FuseOptions.from_strings(flags, fuse, log_file=a.log_file,
                                        **({"default_permissions": False} if ndp else {}))
    except (UsageError, ValueError) as exc:
        print(f"erofs-mount: {exc}", file=sys.stderr)
        return 2
    return mount(a.args[0], a.args[1], opts, foreground=a.foreground, devices=a.device)


if __name__ == "__main__":
    sys.exit(main())
