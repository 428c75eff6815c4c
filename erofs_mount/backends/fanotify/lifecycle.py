"""fanotify mode entry points for the CLI (synchronous; call them OUTSIDE ``trio.run``).

    mount(source, kind, mountpoint, opts, foreground) -> int   0 once the filesystem is mounted
    reattach(mountpoint, foreground) -> int                    a new daemon for a live mount
    unmount(mountpoint) -> int                                 umount, then daemon, holder, guard
    status(out) -> int / status_entries()                      one line per fanotify mount
    owns(mountpoint) -> bool                                   a record names this erofs mount

Three processes serve a mount: the daemon (daemon.py: fetches), the holder (holder.py: owns the
pre-content group, so a daemon may die and be replaced with no reader error) and the guard
(guard.py: denies reads of holes when the holder is gone, so nothing is ever read as zeros).
"""

from __future__ import annotations

import errno as _errno
import os
import signal
import sys
import time

from ...daemon import log_path, run_detached
from ...errors import ErofsMountError, UsageError
from ...status import hosts_text, size_text, verity_counts, verity_text
from .. import kmount
from . import kernel, record

WINDOW_LOCAL = 256 << 10
WINDOW_REMOTE = 1 << 20


def cache_root(oci: dict) -> str:
    from ...sources.diskcache import default_root

    root = oci.get("oci.cache")
    if root in ("none", "off"):
        raise UsageError("fanotify mode keeps the image in the cache (the sparse file is the cache): "
                         "oci.cache=none is not possible")
    return default_root() if root in (None, "", "auto") else os.path.abspath(root)


def mount(source: str, kind: str, mountpoint: str, oci: dict[str, str | None], *, flags: int = 0, data: str = "",
          foreground: bool = False) -> int:
    """``kind``: "local" | "layer" | "s3" (opener.classify); ``oci``: the raw ``oci.*`` options (an S3
    object's ``s3.*``, its ``s3.cache`` as ``oci.cache``: the sparse file's root); ``flags``,
    ``data``: mount(2) flags and erofs options (nosuid, acl, …)."""
    if os.geteuid() != 0:
        raise ErofsMountError("fanotify mode needs root (fanotify permission events need CAP_SYS_ADMIN); "
                              "use --mode fuse", errno=_errno.EPERM)
    if kind == "image":
        raise UsageError("a whole image is mounted layer by layer (backends/image.py), not here")
    if not os.path.isdir(mountpoint):
        raise ErofsMountError(f"{mountpoint}: mount point is not a directory", errno=_errno.ENOTDIR)
    root = cache_root(oci)
    reason = kernel.unsupported_reason(root)
    if reason:
        raise ErofsMountError(reason, errno=_errno.EOPNOTSUPP)
    mountpoint = os.path.realpath(mountpoint)
    there = record.read(mountpoint)
    if there is not None and record.mounted(mountpoint, there["data"]):
        raise ErofsMountError(f"{mountpoint}: a fanotify mount is there already", errno=_errno.EBUSY)
    spec = {"kind": kind if kind in ("local", "s3") else "oci",
            "source": os.path.realpath(source) if kind == "local" else source,
            "oci": {**oci, "oci.cache": root}, "cache_root": root,   # a tar layer's index kept there too
            "mount_flags": flags, "mount_data": data}
    window = WINDOW_LOCAL if kind == "local" else WINDOW_REMOTE

    def worker(ready):
        import trio

        from .daemon import mount_main

        return trio.run(mount_main, spec, mountpoint, window, ready)

    return run_detached(worker, log_file=log_path("fanotify"), foreground=foreground)


def owns(mountpoint: str) -> bool:
    return record.read(mountpoint) is not None


def reattach(mountpoint: str, *, foreground: bool = False) -> int:
    mountpoint = os.path.realpath(mountpoint)
    doc = record.read(mountpoint)
    if doc is None or not record.mounted(mountpoint, doc["data"]):
        raise UsageError(f"{mountpoint}: not a fanotify mount of erofs-mount")
    if record.alive(doc["pids"].get("daemon")):
        raise ErofsMountError(f"{mountpoint} is still served by a live daemon (pid {doc['pids']['daemon']})",
                              errno=_errno.EBUSY)
    if doc["pids"].get("holder") and not record.alive(doc["pids"]["holder"]):
        raise ErofsMountError(f"{mountpoint}: its holder (pid {doc['pids']['holder']}) is gone: reads of what is "
                              "not local fail with EIO; unmount and mount again", errno=_errno.EIO)

    def worker(ready):
        import trio

        from .daemon import reattach_main

        return trio.run(reattach_main, doc, ready)

    return run_detached(worker, log_file=log_path("fanotify"), foreground=foreground)


def _stop(pid, timeout: float) -> None:
    if not record.alive(pid):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while record.alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if record.alive(pid):
        os.kill(pid, signal.SIGKILL)


def unmount(mountpoint: str) -> int:
    mountpoint = os.path.realpath(mountpoint)
    doc = record.read(mountpoint)
    if doc is None:
        raise UsageError(f"{mountpoint}: not a fanotify mount of erofs-mount")
    if record.mounted(mountpoint, doc["data"]):
        kmount.umount(mountpoint)
    # the daemon first (it publishes last), then the holder: it denies (EIO) what is still pending
    # before its group goes; the guard last
    for name in ("daemon", "holder", "guard"):
        _stop(doc["pids"].get(name), 10.0)
    record.remove(mountpoint)
    return 0


def status_entries() -> list[dict]:
    out = []
    for doc in record.every():
        pids = doc.get("pids") or {}
        st = dict(doc.get("stats") or {})
        source = dict(st.get("source") or {})
        for k, v in (doc.get("carried") or {}).items():     # what earlier daemons of the mount did
            into = source if k in record.CARRIED_SOURCE_KEYS else st
            into[k] = int(into.get(k, 0)) + int(v)
        out.append({"mountpoint": doc["mountpoint"], "source": doc["source"], "kind": doc["kind"],
                    "mounted": record.mounted(doc["mountpoint"], doc["data"]),
                    "pids": pids, "alive": {k: record.alive(v) for k, v in pids.items()},
                    "size": doc.get("size", 0), "bytes_local": st.get("bytes_local", 0),
                    "fetches": st.get("fetches", 0), "bytes_fetched": st.get("bytes_fetched", 0),
                    "events": st.get("requests", 0), "denied": st.get("denied", 0),
                    "daemons": doc.get("daemons", 1), "verity": verity_counts(source),
                    "hosts": source.get("hosts")})
    return out


def status_line(e: dict) -> str:
    procs = " ".join(f"{k}={v}({'alive' if e['alive'].get(k) else 'dead'})" for k, v in e["pids"].items())
    return (f"fanotify {e['mountpoint']} source={e['source']} mounted={'yes' if e['mounted'] else 'no'} "
            f"bytes_local={size_text(e['bytes_local'])} size={size_text(e['size'])} "
            f"fetches={e['fetches']} bytes_fetched={size_text(e['bytes_fetched'])} fills={e['events']} "
            f"denied={e['denied']} daemons={e['daemons']} {verity_text(e.get('verity'))}{hosts_text(e.get('hosts'))} {procs}")


def status(out=None) -> int:
    out = out or sys.stdout
    for e in status_entries():
        print(status_line(e), file=out)
    return 0
