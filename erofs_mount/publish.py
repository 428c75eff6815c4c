"""What a serving daemon tells ``erofs-mount status`` — the part every mode shares (NBD:
backends/nbd/publish.py, FUSE: backends/fuse/publish.py, fanotify: backends/fanotify/record.py add
where their documents live and what else they hold).

    process_start(pid) -> int | None        start time in clock ticks (proc(5) stat field 22); None
                                            for no process, a zombie or a dead one
    alive(pid, pid_start=None) -> bool      a live process (with ``pid_start``: that very process,
                                            not one that reused its pid)
    source_fields(source_text, source)      kind "oci" (ref as named, pinned_ref, platform, digest,
                                            manifest_digest), "s3" (ref, digest: the pinned ETag
                                            and version) or "local" (path)
    source_stats(source, keys)              the source's integer counters; a display never raises
    Publisher(path, snapshot)               ``await run(interval)`` rewrites ``path`` with
                                            ``snapshot()`` (atomically, 0600) until cancelled; one
                                            warning if it cannot

Documents never hold a secret: references, paths, pids and counters only.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from .statefile import write_json
from .status import SOURCE_STAT_KEYS

log = logging.getLogger("erofs_mount.publish")

STATS_INTERVAL = 1.0


def process_start(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b") ", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] in (b"Z", b"X"):  # zombie or dead: not a daemon any more
        return None
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def alive(pid: Any, pid_start: int | None = None) -> bool:
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    start = process_start(pid)
    return start is not None and (pid_start is None or start == pid_start)


def source_fields(source_text: str, source: Any) -> dict:
    if getattr(source, "etag", None) is not None:   # an S3 object, pinned
        return {"kind": "s3", "ref": source_text, "pinned_ref": str(source.ref), "platform": None,
                "digest": source.pinned, "manifest_digest": None}
    if hasattr(source, "ref") and hasattr(source, "digest"):
        # ref as the user named it; pinned_ref: the manifest the daemon resolved it to (ref@sha256:...)
        return {"kind": "oci", "ref": source_text, "pinned_ref": str(source.ref),
                "platform": getattr(source, "platform", None), "digest": source.digest,
                "manifest_digest": getattr(source, "manifest_digest", None)}
    return {"kind": "local", "path": getattr(source, "path", source_text)}


def source_stats(source: Any, keys: tuple[str, ...] = SOURCE_STAT_KEYS) -> dict:
    try:
        raw = source.stats() if hasattr(source, "stats") else {}
    except Exception as exc:  # noqa: BLE001 - a display must not stop serving
        return {"error": repr(exc)}
    out = {k: raw[k] for k in keys if isinstance(raw.get(k), int)}
    if isinstance(raw.get("hosts"), dict) and raw["hosts"]:   # blob bytes per registry host (mirrors)
        out["hosts"] = {str(k): v for k, v in raw["hosts"].items() if isinstance(v, int)}
    return out


class Publisher:
    def __init__(self, path: str, snapshot: Callable[[], dict]) -> None:
        self.path = path
        self.snapshot = snapshot
        self._failed = False

    def publish(self) -> None:
        try:
            doc = self.snapshot()
            doc["updated"] = time.time()
            write_json(self.path, doc, make_dir=True)
        except OSError as exc:
            if not self._failed:
                log.warning("cannot publish statistics to %s: %s", self.path, exc)
            self._failed = True

    async def run(self, interval: float = STATS_INTERVAL) -> None:
        import trio

        while True:
            self.publish()
            await trio.sleep(interval)


__all__ = ["STATS_INTERVAL", "Publisher", "alive", "process_start", "source_fields", "source_stats"]
