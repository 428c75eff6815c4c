"""What a FUSE daemon tells ``erofs-mount status``: one small JSON document per mount.

    <stats_dir()>/<key(mountpoint)>.json   0600 in a 0700 directory, rewritten every STATS_INTERVAL s
        {"version": 1, "pid", "pid_start", "uid", "mountpoint", "mount_id", "started", "updated",
         "kind": "oci"|"local", "source", "path" | "ref", "pinned_ref", "platform", "digest", "manifest_digest",
         "stats": {the source's counters}}

``stats_dir()``: ``/run/erofs-mount/fuse`` for root; ``$XDG_RUNTIME_DIR/erofs-mount/fuse`` for a user
who has one, else ``$XDG_STATE_HOME/erofs-mount/fuse`` (``~/.local/state/...``).  The document never
holds a secret (only the source's reference and counters).  The daemon removes it when it ends; a
SIGKILLed daemon leaves it behind, so ``status`` can show that daemon as dead (``pid_start`` tells a
reused pid from ours).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from typing import Any

from ...publish import alive, process_start, source_fields, source_stats
from ...publish import Publisher as _Publisher
from ...statefile import read_json  # noqa: F401 - re-exported for fuse.status
from ...status import SOURCE_STAT_KEYS

log = logging.getLogger("erofs_mount.fuse")

ROOT_DIR = "/run/erofs-mount/fuse"
_SOURCE_KEYS = SOURCE_STAT_KEYS + ("bytes_read",)


def user_dirs(env: dict, home: str, uid: int) -> list[str]:
    """Where a user's daemons publish, best first (pure)."""
    out = []
    runtime = env.get("XDG_RUNTIME_DIR")
    if runtime:
        out.append(os.path.join(runtime, "erofs-mount", "fuse"))
    state = env.get("XDG_STATE_HOME") or os.path.join(home, ".local", "state")
    out.append(os.path.join(state, "erofs-mount", "fuse"))
    if not runtime:
        out.append(os.path.join(f"/run/user/{uid}", "erofs-mount", "fuse"))
    return out


def stats_dir() -> str:
    if os.geteuid() == 0:
        return ROOT_DIR
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime) and os.stat(runtime).st_uid == os.geteuid():
        return os.path.join(runtime, "erofs-mount", "fuse")
    return user_dirs({k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"},
                     os.path.expanduser("~"), os.geteuid())[0]


def key(mountpoint: str) -> str:
    return hashlib.sha256(os.fsencode(mountpoint)).hexdigest()[:20] + ".json"


def daemon_alive(doc: dict) -> bool:
    return alive(doc.get("pid"), doc.get("pid_start")) and doc.get("pid_start") is not None


def base_document(source_text: str, mountpoint: str, source: Any) -> dict:
    pid = os.getpid()
    doc: dict[str, Any] = {"version": 1, "pid": pid, "pid_start": process_start(pid), "uid": os.geteuid(),
                           "mountpoint": mountpoint, "mount_id": None, "started": time.time(),
                           "source": source_text}
    doc.update(source_fields(source_text, source))
    return doc


def snapshot(base: dict, source: Any) -> dict:
    doc = dict(base)
    doc["updated"] = time.time()
    doc["stats"] = source_stats(source, _SOURCE_KEYS)
    return doc


class Publisher(_Publisher):
    """The daemon's side: ``await run()`` rewrites the document until cancelled; ``remove()`` at exit."""

    def __init__(self, source_text: str, mountpoint: str, source: Any, directory: str | None = None) -> None:
        self.base = base_document(source_text, mountpoint, source)
        self.source = source
        super().__init__(os.path.join(directory or stats_dir(), key(mountpoint)),
                         lambda: snapshot(self.base, self.source))
        prune(os.path.dirname(self.path))

    def remove(self) -> None:
        doc = read_json(self.path)
        if doc is not None and doc.get("pid") == os.getpid():  # not a newer mount's document
            try:
                os.unlink(self.path)
            except OSError:
                pass


def forget(mountpoint: str, directory: str | None = None) -> None:
    """After an unmount: drop the document a killed daemon left for ``mountpoint`` (a live one removes its own)."""
    path = os.path.join(directory or stats_dir(), key(mountpoint))
    doc = read_json(path)
    if doc is not None and doc.get("mountpoint") == mountpoint and not daemon_alive(doc):
        try:
            os.unlink(path)
        except OSError:
            pass


def prune(directory: str, mountinfo: str = "/proc/self/mountinfo") -> None:
    """Drop documents left by killed daemons whose mount is gone too (bounded: one directory listing)."""
    from .mountinfo import parse_mountinfo

    try:
        names = [n for n in os.listdir(directory) if n.endswith(".json")][:10000]
        with open(mountinfo, encoding="utf-8", errors="surrogateescape") as f:
            mounted = {e.mountpoint for e in parse_mountinfo(f.read()) if e.fstype.startswith("fuse")}
    except OSError:
        return
    for name in names:
        path = os.path.join(directory, name)
        doc = read_json(path)
        if doc is None or doc.get("mountpoint") in mounted or daemon_alive(doc):
            continue
        try:
            os.unlink(path)
        except OSError:
            pass
