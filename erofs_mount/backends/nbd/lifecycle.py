"""NBD mode entry points for the CLI (synchronous; call them OUTSIDE ``trio.run``).

    mount(source, mountpoint, opts) -> int       exits 0 only once the filesystem is mounted
    mount_oci(ref, mountpoint, opts, oci) -> int  the same for a registry layer (digest pinned)
    unmount(mountpoint) -> int                   umount; the autoclear disconnect ends the daemon
    reattach(device, opts) -> int                a new daemon for a device whose daemon died
    disconnect(device) -> int                    force NBD_CMD_DISCONNECT and clean up
    status() -> int                              one line per NBD device erofs-mount serves: source,
                                                 (OCI) platform and pinned digest, daemon pid and
                                                 liveness, mount points, and what the daemon last
                                                 published (publish.py): bytes fetched, cache hit
                                                 ratio, retries, totals across reattaches
    status_entries() -> list[dict]               the same as data (for a future `status --json`)
    supervise(opts) -> int                       detached: reattach automatically on LINK_DEAD

Failures raise ``ErofsMountError`` (one-line message, errno); nothing is left behind
by a failed mount.  ``python -m erofs_mount.backends.nbd.lifecycle`` drives them
until the CLI does.
"""

from __future__ import annotations

import errno as _errno
import os
import sys
import time

from ...daemon import log_path, run_detached
from ...errors import ErofsMountError, NotFoundError, UsageError
from ...status import hosts_text, ratio_text, size_text
from .. import kmount
from . import ioctl, netlink, state, sysfs
from .config import NbdOptions, nbd_options_from
from .recovery import NBD_RUN_DIR, LocalRecord, S3ObjectRecord, record_path
from .source import override_record

IOCTL_ENV = "EROFS_MOUNT_NBD_IOCTL"  # =1 forces the ioctl fallback (tests)
EXIT_GRACE = 2.0  # seconds a reattach waits for a dying daemon to release its pid file


def choose_mode(opts: NbdOptions) -> str:
    """"netlink" or "ioctl" (only when the family is absent or forced); else a one-line error."""
    if opts.mode == "ioctl" or os.environ.get(IOCTL_ENV) == "1":
        return "ioctl"
    if netlink.family_available():
        return "netlink"
    if opts.mode == "netlink":
        raise ErofsMountError(netlink.MISSING_DRIVER, errno=_errno.ENODEV)
    if sysfs.module_loaded() and sysfs.indexes():
        print("erofs-mount: nbd netlink family absent: ioctl mode, reattach unavailable in ioctl mode",
              file=sys.stderr)
        return "ioctl"
    raise ErofsMountError(netlink.MISSING_DRIVER, errno=_errno.ENODEV)


def _local_record(source: str, verity=None) -> LocalRecord:
    from .source import verity_lines

    if not os.path.exists(source):
        raise NotFoundError(f"{source}: no such file")
    return LocalRecord(os.path.realpath(source), verity_lines(verity))


def mount(source: str, mountpoint: str, opts: NbdOptions | None = None, verity=None) -> int:
    """``verity``: a verity/options.py Choice: the filesystem is mounted on a dm-verity device over
    /dev/nbdN (verity/dm.py), which the kernel checks block by block."""
    opts = opts or NbdOptions()
    if not os.path.isdir(mountpoint):
        raise NotFoundError(f"{mountpoint}: mount point is not a directory")
    record = _local_record(source, verity)
    mode = choose_mode(opts)
    mountpoint = os.path.realpath(mountpoint)

    def worker(ready):
        import trio

        from .worker import mount_main

        return trio.run(mount_main, record, mountpoint, opts, mode, ready)

    return run_detached(worker, log_file=opts.log_file or log_path("nbd"), foreground=opts.foreground)


def mount_oci(ref: str, mountpoint: str, opts: NbdOptions | None, oci_options) -> int:
    """Mount a registry layer (``oci_options``: sources.oci.options.OciOptions); the record
    pins the digest resolved now (OCI_NATIVE_BLOB)."""
    from .worker import OciTarget

    return _mount_remote(OciTarget(ref, oci_options), mountpoint, opts)


def mount_s3(source: str, mountpoint: str, opts: NbdOptions | None, s3_options) -> int:
    """Mount an S3 object (``s3_options``: sources.s3.options.S3Options); the record (erofs-utils'
    S3_OBJECT) pins the ETag and version seen now."""
    from .worker import S3Target

    return _mount_remote(S3Target(source, s3_options), mountpoint, opts)


def _mount_remote(target, mountpoint: str, opts: NbdOptions | None) -> int:
    """A remote source (worker.OciTarget / S3Target): opened, and its record written, in the daemon."""
    opts = opts or NbdOptions()
    if not os.path.isdir(mountpoint):
        raise NotFoundError(f"{mountpoint}: mount point is not a directory")
    mode = choose_mode(opts)
    mountpoint = os.path.realpath(mountpoint)

    def worker(ready):
        import trio

        from .worker import mount_main

        return trio.run(mount_main, target, mountpoint, opts, mode, ready)

    return run_detached(worker, log_file=opts.log_file or log_path("nbd"), foreground=opts.foreground)


def mount_image(ref: str, mountpoint: str, opts: NbdOptions | None, oci_options) -> int:
    """The whole image: one device per layer under the overlayfs at ``mountpoint`` (backends/image.py)."""
    from ..image import mount_image as mount_layers

    opts = opts or NbdOptions()
    return mount_layers(ref, mountpoint, oci_options, lambda pinned, d, o: mount_oci(pinned, d, opts, o),
                        unmount, flags=opts.mount_flags)


def reattach(device: str, opts: NbdOptions | None = None, oci: dict[str, str] | None = None) -> int:
    """``oci``: ``-o oci.*`` given with --reattach (keys without ``oci.``), overriding the record."""
    opts = opts or NbdOptions()
    index = sysfs.index_of(device)
    if sysfs.size_bytes(index) == 0:
        raise ErofsMountError(f"{device} is not connected: nothing to reattach", errno=_errno.ENOTCONN)
    ident = sysfs.backend(index) or record_path(index, opts.run_dir)
    original = state.read_record(ident)  # missing/malformed: a clear error, nothing touched
    record = override_record(original, oci or {})
    if dict(record.options).get("mode") == "ioctl":
        raise ErofsMountError(f"{device} was attached in ioctl mode: reattach unavailable in ioctl mode",
                              errno=_errno.EOPNOTSUPP)
    if isinstance(record, LocalRecord) and not os.path.exists(record.path):
        raise NotFoundError(f"{device}: the source {record.path} named by {ident} is gone")
    pidfile = state.pid_path(ident)
    # a daemon killed a moment ago holds its pid file's lock until the kernel has torn it down
    # (`kill -9 PID; erofs-mount --reattach DEV`): give it that moment before refusing
    if state.daemon_alive(pidfile) and not _wait(lambda: not state.daemon_alive(pidfile), EXIT_GRACE):
        pid = state.read_pid(pidfile)
        raise ErofsMountError(f"{device} is still served by a live erofs-mount daemon (pid {pid})",
                              errno=_errno.EBUSY)
    if not netlink.family_available():
        raise ErofsMountError(netlink.MISSING_DRIVER + " (reattach needs netlink)", errno=_errno.ENODEV)

    def worker(ready):
        import trio

        from .worker import reattach_main

        return trio.run(reattach_main, index, ident, record, opts, ready, record != original)

    return run_detached(worker, log_file=opts.log_file or log_path("nbd"), foreground=opts.foreground)


def supervise(opts: NbdOptions | None = None) -> int:
    """Start the detached supervisor: it reattaches our devices on NBD_CMD_LINK_DEAD."""
    opts = opts or NbdOptions()
    if not netlink.family_available():
        raise ErofsMountError(netlink.MISSING_DRIVER + " (the supervisor needs netlink)", errno=_errno.ENODEV)

    def worker(ready):
        from .supervise import supervise as loop

        ready.ok()
        return loop(opts)

    return run_detached(worker, log_file=opts.log_file or log_path("nbd"), foreground=opts.foreground)


def _wait(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def disconnect(device: str, run_dir: str | None = None, timeout: float = 10.0) -> int:
    index = sysfs.index_of(device)
    ident = sysfs.backend(index) or record_path(index, run_dir or NBD_RUN_DIR)
    if netlink.family_available():
        netlink.disconnect(index)
    else:
        ioctl.disconnect(index)
    pidfile = state.pid_path(ident)
    if not _wait(lambda: not state.daemon_alive(pidfile), timeout):
        raise ErofsMountError(f"{device}: disconnected, but its daemon pid {state.read_pid(pidfile)} is still running",
                              errno=_errno.EBUSY)
    state.remove_quietly(ident, pidfile, state.stats_path(ident))
    return 0


def unmount(mountpoint: str, timeout: float = 10.0) -> int:
    """umount; then wait (bounded) for the autoclear disconnect to end the daemon; in ioctl
    mode (no autoclear) disconnect explicitly."""
    from ...verity import dm

    m = sysfs.mount_at(mountpoint)
    verity_index = dm.nbd_index_of(m.source) if m is not None else None
    if m is None or not (m.source.startswith("/dev/nbd") or verity_index is not None):
        raise UsageError(f"{mountpoint} is not an erofs-mount NBD mount")
    index = verity_index if verity_index is not None else sysfs.index_of(m.source)
    ident = sysfs.backend(index) or record_path(index)
    kmount.umount(os.path.realpath(mountpoint))
    if sysfs.mountpoints_of(index):
        return 0  # mounted elsewhere too: the device stays
    if verity_index is not None:  # the dm-verity device holds /dev/nbdN open: its removal lets autoclear run
        dm.remove(dm.name_for(index))
    pidfile = state.pid_path(ident)
    try:
        ioctl_mode = dict(state.read_record(ident).options).get("mode") == "ioctl"
    except ErofsMountError:
        ioctl_mode = False
    # netlink mode: the autoclear disconnect ends the daemon; ioctl mode has no autoclear
    if ioctl_mode or not _wait(lambda: sysfs.size_bytes(index) == 0 and not state.daemon_alive(pidfile),
                               timeout / 2):
        disconnect(m.source, timeout=timeout / 2)
    state.remove_quietly(ident, pidfile, state.stats_path(ident))
    return 0


def status_entries() -> list[dict]:
    """Every NBD device erofs-mount serves: index, source, OCI ref/platform/pinned digest, daemon pid
    and liveness, mount points, and the figures the daemon last published (``status.summary``)."""
    from ...status import summary

    out = []
    for index in sysfs.indexes():
        ident = sysfs.backend(index)
        candidates = [ident] if ident else [record_path(index)]
        path = next((p for p in candidates if p and os.path.exists(p)), None)
        if path is None or sysfs.size_bytes(index) == 0:
            continue
        e: dict = {"index": index, "device": sysfs.device_path(index), "record": path, "kind": "local",
                   "source": None, "ref": None, "platform": None, "digest": None}
        try:
            rec = state.read_record(path)
        except ErofsMountError as exc:
            e["source"] = f"<{exc}>"
        else:
            if isinstance(rec, LocalRecord):
                e["source"] = rec.path
            elif isinstance(rec, S3ObjectRecord):
                from ...sources.s3.options import pinned_text

                o = dict(rec.options)
                e.update(kind="s3", source=f"s3://{rec.source}", ref=f"s3://{rec.source}",
                         digest=pinned_text(o["s3.etag"], o.get("s3.version_id")) if o.get("s3.etag") else None)
            else:
                e.update(kind="oci", source=rec.ref, ref=rec.ref, platform=rec.platform,
                         digest=getattr(rec, "digest", None))
        pidfile = state.pid_path(path)
        e["pid"] = state.read_pid(pidfile)
        e["alive"] = state.daemon_alive(pidfile)
        e["mountpoints"] = sysfs.mountpoints_of(index)
        published = state.read_json(state.stats_path(path))
        if published and e["kind"] == "oci" and not e["digest"]:
            e["digest"] = published.get("digest")  # an OCI_LAYER record: what the daemon resolved
        e.update(summary(published))
        e["published"] = published is not None
        out.append(e)
    return out


def status_line(e: dict) -> str:
    parts = [f"nbd{e['index']}", f"source={e['source']}"]
    if e["kind"] == "oci":
        parts += [f"platform={e['platform']}", f"digest={e['digest'] or '-'}"]
    elif e["kind"] == "s3":
        parts.append(f"pinned={e['digest'] or '-'}")
    else:
        parts.append("digest=-")
    parts += [f"pid={e['pid'] or '-'}", f"daemon={'alive' if e['alive'] else 'dead'}",
              f"mount={','.join(e['mountpoints']) or '-'}"]
    if e["published"]:
        parts += [f"bytes_fetched={size_text(e['bytes_fetched'])}",
                  f"bytes_fetched_total={size_text(e['bytes_fetched_total'])}",
                  f"cache_hit_ratio={ratio_text(e['cache_hit_ratio'])}", f"retries={e['retries']}",
                  f"retries_total={e['retries_total']}", f"daemons={e['daemons']}" + hosts_text(e.get("hosts"))]
    return " ".join(parts)


def status(out=None) -> int:
    """Images first (backends/image.py status_lines), then the devices that belong to no image."""
    from ..image import live_images, status_lines as image_status_lines

    out = out or sys.stdout
    entries = [{**e, "key": ("nbd", e["index"]), "line": status_line(e)} for e in status_entries()]
    lines = image_status_lines(entries, live_images())
    for line in lines:
        print(line, file=out)
    if not lines:
        print("no NBD devices served by erofs-mount", file=out)
    return 0


def _main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m erofs_mount.backends.nbd.lifecycle")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, arg2 in (("mount", True), ("reattach", False)):
        s = sub.add_parser(name)
        s.add_argument("target")
        if arg2:
            s.add_argument("mountpoint")
        s.add_argument("-o", dest="options", default="")
    sub.add_parser("disconnect").add_argument("device")
    sub.add_parser("umount").add_argument("mountpoint")
    sub.add_parser("status")
    a = p.parse_args(argv)
    try:
        if a.cmd in ("mount", "reattach"):
            opts = nbd_options_from(o for o in a.options.split(",") if o)
            if a.cmd == "mount":
                return mount(a.target, a.mountpoint, opts)
            return reattach(a.target, opts)
        if a.cmd == "disconnect":
            return disconnect(a.device)
        if a.cmd == "umount":
            return unmount(a.mountpoint)
        return status()
    except ErofsMountError as exc:
        print(f"erofs-mount: {exc}", file=sys.stderr)
        return exc.exit_status


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))


__all__ = ["mount", "mount_oci", "mount_image", "unmount", "reattach", "disconnect", "status", "status_line",
           "status_entries", "supervise", "choose_mode", "NbdOptions"]
