"""FUSE mode: mount an image with pyfuse3, serve it until unmounted, and unmount it.

    mount(source, mountpoint, FuseOptions(...), foreground=False, devices=()) -> int
    unmount(mountpoint) -> int

``mount`` detaches (``erofs_mount.daemon.run_detached``) and returns 0 only
once the mounted filesystem answered a ``stat`` of its root; otherwise it
prints the daemon's one-line error and returns 1.  The daemon ends when the
mount goes away (``-u``, ``umount``, ``umount -l``, ``fusermount3 -u``) or on
SIGTERM/SIGINT/SIGHUP, which unmount first.

The seam for sources: the operations take an ``Image``; ``open_image`` builds it
from a source.  Today a source is a local file or block device (read with
positional reads in the worker threads); an OCI source will open here too, its
``Image`` reading through ``sources.SyncReadAt`` (the reader already runs in
trio worker threads, so ``trio.from_thread.run`` is available to it).
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import logging
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field, replace
from typing import Iterable, Mapping

from ...errors import ErofsMountError, SourceError, UsageError
from .mountinfo import find_mount

log = logging.getLogger("erofs_mount.fuse")

# mount(2) flags libfuse passes on to the kernel (lib/mount.c, mount_flags[]); ro is always added
PASSED_FLAGS = frozenset({"nosuid", "suid", "nodev", "dev", "noexec", "exec", "noatime", "atime",
                          "nodiratime", "diratime", "relatime", "norelatime", "strictatime",
                          "nostrictatime", "lazytime", "nolazytime", "sync", "async", "dirsync"})


@dataclass(frozen=True)
class FuseOptions:
    allow_other: bool = False
    allow_root: bool = False
    default_permissions: bool | None = None   # None: on unless root mounts without allow_other/allow_root
    auto_unmount: bool = False
    fsname: str | None = None                 # None: the source path
    subtype: str = "erofs"
    uid: int | None = None                    # report every inode with this owner
    gid: int | None = None
    max_read: int | None = None
    nosuid: bool = False
    nodev: bool = False
    noexec: bool = False
    noatime: bool = False
    flags: tuple[str, ...] = ()               # other mount(2) flags from PASSED_FLAGS
    foreground: bool = False
    debug: bool = False
    threads: int = 8                          # reader worker threads
    log_file: str | None = None               # None: daemon.log_path("fuse")

    @classmethod
    def from_strings(cls, flags: Iterable[str] = (), fuse: Mapping[str, str] = (), **kw) -> "FuseOptions":
        """From options.MountOptions' ``flags`` (mount(2) flags) and ``fuse`` (key -> value, "" for flags)."""
        fuse = dict(fuse)
        args: dict = dict(kw)
        for key in ("allow_other", "allow_root", "default_permissions", "auto_unmount"):
            if key in fuse:
                args[key] = True
        for key in ("fsname", "subtype"):
            if key in fuse:
                args[key] = fuse[key]
        for key in ("uid", "gid", "max_read"):
            if key in fuse:
                args[key] = int(fuse[key])
        unknown = set(fuse) - {"allow_other", "allow_root", "default_permissions", "auto_unmount", "fsname",
                               "subtype", "uid", "gid", "max_read"}
        if unknown:
            raise UsageError(f"unknown FUSE option '{sorted(unknown)[0]}'")
        rest = []
        for flag in flags:
            if flag in ("nosuid", "nodev", "noexec", "noatime"):
                args[flag] = True
            elif flag in PASSED_FLAGS:
                rest.append(flag)
            # flags the kernel FUSE mount has no use for (silent, loud) are dropped
        args["flags"] = tuple(rest)
        return cls(**args)

    def libfuse_options(self, source: str, *, is_root: bool) -> set[str]:
        """The option set handed to ``pyfuse3.init`` (libfuse mount + session options)."""
        if self.allow_other and self.allow_root:
            raise UsageError("allow_other and allow_root are mutually exclusive")
        opts = {"ro", f"subtype={self.subtype}", f"fsname={_escape(self.fsname or source)}"}
        if self.resolved_default_permissions(is_root=is_root):
            opts.add("default_permissions")
        for key in ("allow_other", "allow_root", "auto_unmount", "nosuid", "nodev", "noexec", "noatime"):
            if getattr(self, key):
                opts.add(key)
        if self.max_read:
            opts.add(f"max_read={self.max_read}")
        for flag in self.flags:
            if flag not in PASSED_FLAGS:
                raise UsageError(f"unknown mount flag '{flag}'")
            opts.add(flag)
        if self.debug:
            opts.add("debug")
        return opts

    def resolved_default_permissions(self, *, is_root: bool) -> bool:
        if self.default_permissions is not None:
            return self.default_permissions
        return not is_root or self.allow_other or self.allow_root


def _escape(value: str) -> str:
    # libfuse splits options at commas; a backslash escapes one (fuse_opt_parse)
    return value.replace("\\", "\\\\").replace(",", "\\,")


# ---------------------------------------------------------------------- sources
class _PreadFile:
    """Fallback local source (regular file): sync positional reads, used when sources/ is absent."""

    def __init__(self, path: str) -> None:
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise SourceError(f"{path}: {exc.strerror}", errno=exc.errno) from None
        self.size = os.fstat(self._fd).st_size
        self.path = path

    def pread(self, offset: int, length: int) -> bytes:
        parts, got = [], 0
        while got < length:
            chunk = os.pread(self._fd, length - got, offset + got)
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
        return b"".join(parts)

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _open_local(path: str):
    try:
        from ...sources.local import LocalSource
    except ImportError:  # the sources layer not present: a plain file reader
        return _PreadFile(path)
    return LocalSource.open(path)


# The kernel caches names, attributes and file pages of a FUSE mount (long timeouts, keep_cache), so
# the daemon's own caches only need to cover what is being worked on; smaller than the reader's
# defaults to keep the daemon's memory bounded (<= 200 MB on a 60k-file image).
IMAGE_CACHES = {"inode_cache": 16384, "block_cache": 1024}
ZDATA_CACHE_BYTES = 16 << 20


def tune_image(image) -> None:
    try:
        z = image.zreader  # the compressed-data reader and its decoded-pcluster cache
    except ErofsMountError:
        return  # no compression support, or none configured: nothing to tune
    if getattr(z, "cache_limit", 0) > ZDATA_CACHE_BYTES:
        z.cache_limit = ZDATA_CACHE_BYTES


def open_image(source: str, devices: Iterable[str] = ()):
    """(Image, [opened sources]) for a local image file or block device plus extra devices.

    Must run in a worker thread or before the trio loop starts (it reads the superblock).
    """
    from ...erofs.image import Image

    from .inline import LocalReader

    opened = []
    try:
        primary = _open_local(source)
        opened.append(primary)
        extra = []
        for dev in devices:
            d = _open_local(dev)
            opened.append(d)
            extra.append(LocalReader(d).read_at)
        image = Image(LocalReader(primary).read_at, size=primary.size, devices=extra, **IMAGE_CACHES)
        tune_image(image)
    except BaseException:
        for src in opened:
            src.close()
        raise
    return image, opened


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


async def _serve(image, mountpoint: str, opts: FuseOptions, source: str, ready, *, inline: bool) -> None:
    import pyfuse3
    import trio

    from .ops import ErofsOperations, OpsConfig

    is_root = os.geteuid() == 0
    dp = opts.resolved_default_permissions(is_root=is_root)
    # inline: the sources honour inline.nowait() (local files); OCI reads always go to worker threads
    ops = ErofsOperations(image, OpsConfig(uid=opts.uid, gid=opts.gid, threads=opts.threads), enable_acl=dp,
                          inline=inline)
    options = opts.libfuse_options(source, is_root=is_root)
    if is_root:
        target = mountpoint
    else:
        # mount through fusermount3 ourselves and hand libfuse the /dev/fuse descriptor: libfuse only
        # falls back to fusermount3 when it can open /dev/fuse itself, which fails where /dev/fuse
        # is 0600 (no udev); fusermount3 is setuid and opens it as root
        target = f"/dev/fd/{_fusermount_mount(mountpoint, options)}"
    try:
        pyfuse3.init(ops, target, options)
    except RuntimeError as exc:
        if not is_root:
            _fusermount_unmount(mountpoint)
        raise ErofsMountError(f"{mountpoint}: FUSE mount failed ({exc}; see the log)",
                              errno=errno.EPERM) from None
    ours = find_mount(mountpoint)  # our mount, to tell it from others stacked on the same path later
    log.info("mounted %s on %s (FUSE, mount id %s)", source, mountpoint, ours.mount_id if ours else "?")
    try:
        async with trio.open_nursery() as nursery:
            async def signals() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
                    async for signum in sigs:
                        log.info("signal %s: unmounting %s", signal.Signals(signum).name, mountpoint)
                        pyfuse3.terminate()
                        return

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
                log.info("ready: %s answers", mountpoint)
                ready.ok()

            async def serve() -> None:
                await pyfuse3.main()
                nursery.cancel_scope.cancel()

            nursery.start_soon(signals)
            nursery.start_soon(probe)
            nursery.start_soon(serve)
    except BaseException:
        log.exception("FUSE main loop failed")
        raise
    finally:
        # a lost mount (umount, umount -l, fusermount3 -u) already detached; unmounting again is harmless
        top = find_mount(mountpoint)
        mounted = top is not None and ours is not None and top.mount_id == ours.mount_id
        log.info("session ended; %s", "unmounting" if mounted else "our mount is already gone")
        if mounted and not is_root:
            _fusermount_unmount(mountpoint)  # libfuse does not unmount what it did not mount
        pyfuse3.close(unmount=mounted and is_root)


_MONITORS: list = []  # (fusermount3 process, socket fd) kept for auto_unmount


def _fusermount_mount(mountpoint: str, options: set[str]) -> int:
    """Mount with ``fusermount3`` (setuid) and receive the /dev/fuse descriptor it opened.

    The protocol libfuse uses (lib/mount.c, fuse_mount_fusermount): the socket in ``_FUSE_COMMFD``
    carries the descriptor back as SCM_RIGHTS; fusermount3 exits once it sent it.
    """
    mount_opts = ",".join(sorted(o for o in options if o != "debug"))
    # with auto_unmount fusermount3 stays alive, watching the socket, and unmounts when we die
    monitor = "auto_unmount" in options
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with parent:
        env = dict(os.environ, _FUSE_COMMFD=str(child.fileno()))
        try:
            proc = subprocess.Popen(["fusermount3", "-o", mount_opts, "--", mountpoint], env=env,
                                    pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL,
                                    stderr=None if monitor else subprocess.PIPE, text=True)
        except OSError as exc:
            child.close()
            raise ErofsMountError(f"cannot run fusermount3: {exc.strerror} (install the fuse3 package)",
                                  errno=exc.errno or errno.ENOENT) from None
        child.close()
        try:
            _msg, fds, _flags, _addr = socket.recv_fds(parent, 1, 1)
        except OSError:
            fds = []
        if monitor and fds:
            _MONITORS.append((proc, parent.detach()))  # the socket must stay open while we serve
            return fds[0]
        try:
            err = proc.communicate(timeout=60)[1]
        except subprocess.TimeoutExpired:
            proc.kill()
            err = proc.communicate()[1]
    if proc.returncode != 0 or not fds:
        for fd in fds:
            os.close(fd)
        lines = [line.removeprefix("fusermount3: ") for line in (err or "").strip().splitlines()]
        raise ErofsMountError(f"{mountpoint}: {lines[-1] if lines else 'fusermount3 failed'}", errno=errno.EPERM)
    return fds[0]


def _fusermount_unmount(mountpoint: str) -> None:
    for cmd in (["fusermount3", "-u", "-q", "--", mountpoint], ["fusermount3", "-u", "-q", "-z", "--", mountpoint]):
        res = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if res.returncode == 0 or find_mount(mountpoint) is None:
            return
        log.warning("%s: %s", " ".join(cmd), res.stderr.strip())


async def _main(opener, mountpoint: str, opts: FuseOptions, source: str, ready) -> None:
    image, closers, inline = await opener()
    try:
        log.info("image %s: block size %d, %d inodes, %d extra device(s)", source, image.block_size,
                 image.sb.inos, image.sb.extra_devices)
        await _serve(image, mountpoint, opts, source, ready, inline=inline)
    finally:
        for close in closers:
            res = close()
            if hasattr(res, "__await__"):
                await res


def _local_opener(source: str, devices: tuple[str, ...]):
    async def opener():
        image, opened = open_image(source, devices)  # a few small reads: fine before serving
        return image, [src.close for src in opened], True
    return opener


def _oci_opener(ref: str, oci_options, devices: tuple[str, ...]):
    async def opener():
        import trio

        from ...erofs.image import Image
        from ...sources.bridge import SyncReadAt
        from ...sources.oci.blob import open_oci_source
        from .inline import LocalReader

        src = await open_oci_source(ref, options=oci_options)
        closers: list = [src.aclose]
        try:
            extra = []
            for dev in devices:
                d = _open_local(dev)
                closers.append(d.close)
                extra.append(LocalReader(d).read_at)
            bridge = SyncReadAt(src, trio.lowlevel.current_trio_token())
            # the reader is sync: build the Image in a worker thread, whose reads come back to this loop
            image = await trio.to_thread.run_sync(
                lambda: Image(bridge.read_at, size=src.size, devices=extra, **IMAGE_CACHES))
            tune_image(image)
        except BaseException:
            with trio.CancelScope(shield=True):
                for close in reversed(closers):
                    res = close()
                    if hasattr(res, "__await__"):
                        await res
            raise
        log.info("OCI layer %s of %s (%d bytes)", getattr(src, "digest", "?"), ref, src.size)
        return image, closers, False
    return opener


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
          devices: Iterable[str] = ()) -> int:
    """Mount ``source`` on ``mountpoint`` with FUSE; 0 once live, else 1 after a one-line error."""
    foreground = foreground or opts.foreground
    mountpoint = os.path.abspath(mountpoint)
    source_abs = os.path.abspath(source)
    if opts.fsname is None:
        opts = replace(opts, fsname=source_abs)
    devices = tuple(os.path.abspath(d) for d in devices)
    return _run(source_abs, mountpoint, opts, _local_opener(source_abs, devices), foreground)


def mount_oci(ref: str, mountpoint: str, opts: FuseOptions, mount_options, *, foreground: bool = False) -> int:
    """Mount an OCI registry layer (``-o oci.layer=N`` / ``oci.blob=sha256:…``) with FUSE.

    ``mount_options`` is the CLI's ``options.MountOptions`` (its ``oci.*``, cache options and devices).
    The registry is resolved in the daemon, after detaching (connections do not survive a fork).
    """
    from ...opener import oci_options

    try:
        oci = oci_options(mount_options)  # option errors here, before detaching
    except ErofsMountError as exc:
        print(f"erofs-mount: {exc}", file=sys.stderr)
        return 1
    mountpoint = os.path.abspath(mountpoint)
    if opts.fsname is None:
        opts = replace(opts, fsname=ref)
    devices = tuple(os.path.abspath(d) for d in getattr(mount_options, "devices", ()))
    return _run(ref, mountpoint, opts, _oci_opener(ref, oci, devices), foreground or opts.foreground)


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


# ---------------------------------------------------------------------- unmounting
MNT_DETACH = 2


def _umount2(path: str, flags: int = 0) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(os.fsencode(path), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)


def unmount(mountpoint: str, *, lazy: bool = False) -> int:
    """Unmount a FUSE mount (also a dead one whose daemon was killed); 0 or 1 with a one-line error."""
    mnt = os.path.abspath(mountpoint)
    entry = find_mount(mnt)
    if entry is None:
        print(f"erofs-mount: {mnt}: not mounted", file=sys.stderr)
        return 1
    if not entry.fstype.startswith("fuse"):
        print(f"erofs-mount: {mnt}: not a FUSE mount ({entry.fstype})", file=sys.stderr)
        return 1
    try:
        if os.geteuid() == 0:
            _umount2(mnt, MNT_DETACH if lazy else 0)
        else:
            cmd = ["fusermount3", "-u", *(["-z"] if lazy else []), "--", mnt]
            res = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
            if res.returncode != 0:
                msg = (res.stderr.strip().splitlines() or ["fusermount3 failed"])[-1]
                raise OSError(errno.EPERM, msg.removeprefix("fusermount3: "), mnt)
    except OSError as exc:
        hint = " (busy: close the files using it, or unmount lazily)" if exc.errno == errno.EBUSY else ""
        print(f"erofs-mount: {mnt}: {exc.strerror}{hint}", file=sys.stderr)
        return 1
    return 0


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
