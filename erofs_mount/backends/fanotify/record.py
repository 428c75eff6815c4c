"""The record of a fanotify mount (one JSON document per mount point, rewritten by its daemon with
the figures ``status`` prints; ``--reattach`` reads how to reopen the source from it).

    /run/erofs-mount/fanotify/<key>.json    the record (key: sha256 of the mount point)
    /run/erofs-mount/fanotify/<key>.sock    the holder's socket (holder.py)
    /run/erofs-mount/fanotify/<key>.lock    the holder's liveness lock (guard.py)
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import time

from ...publish import alive  # noqa: F401 - the liveness callers of this module use
from ...statefile import read_json, write_json
from ..fuse.mountinfo import find_mount

STATE_DIR = "/run/erofs-mount/fanotify"
# the figures a reattached daemon carries over from the one it replaces (``carried``), so that status
# counts since the mount: the daemon's own, and a verified source's blocks (verity/source.py)
CARRIED_KEYS = ("fetches", "bytes_fetched", "requests", "denied")
CARRIED_SOURCE_KEYS = ("verity_blocks_verified", "verity_blocks_failed")


def _base(mountpoint: str) -> str:
    return os.path.join(STATE_DIR, hashlib.sha256(os.path.realpath(mountpoint).encode()).hexdigest()[:32])


def new(spec: dict, mountpoint: str, data: str, key: str, size: int, window: int) -> dict:
    base = _base(mountpoint)
    os.makedirs(STATE_DIR, mode=0o700, exist_ok=True)
    return {"mode": "fanotify", "mountpoint": os.path.realpath(mountpoint), "source": spec["source"],
            "kind": spec["kind"], "spec": spec, "data": data, "key": key, "size": size, "window": window,
            "socket": base + ".sock", "lock": base + ".lock", "pids": {}, "started": time.time(), "daemons": 1}


def path(mountpoint: str) -> str:
    return _base(mountpoint) + ".json"


def write(doc: dict) -> None:
    doc["updated"] = time.time()
    write_json(path(doc["mountpoint"]), doc, make_dir=True)


def read(mountpoint: str) -> dict | None:
    doc = read_json(path(mountpoint))
    return doc if doc and doc.get("mode") == "fanotify" else None


def remove(mountpoint: str) -> None:
    base = _base(mountpoint)
    for suffix in (".json", ".sock", ".lock"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(base + suffix)


def mounted(mountpoint: str, data: str) -> bool:
    m = find_mount(os.path.realpath(mountpoint))
    return m is not None and m.fstype == "erofs" and m.source == data


def every() -> list[dict]:
    out = []
    for path in sorted(glob.glob(os.path.join(STATE_DIR, "*.json"))):
        doc = read_json(path)
        if doc and doc.get("mode") == "fanotify":
            out.append(doc)
    return out

