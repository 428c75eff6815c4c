"""What a serving daemon tells ``erofs-mount status``: a small JSON file next to the record.

    <record>.stats   {"version": 1, "pid", "index", "started", "updated", "kind": "oci"|"local",
                      "source", "ref", "platform", "digest", "manifest_digest", "path",
                      "stats": {the source's counters}, "server": {the NBD server's counters},
                      "carried": {"bytes_fetched", "retries", "daemons"}}

The daemon rewrites it every ``STATS_INTERVAL`` seconds while it serves (atomically:
temp file + rename; never a secret).  A killed daemon leaves its last version behind, so
status can still show the dead daemon's figures and a reattach knows which digest the
device was serving; a reattaching daemon folds the previous daemon's counters into
``carried`` (totals since the mount).  ``summary(doc)`` (pure) gives the figures status prints.

    serve_published(sock, source, doc_base, path, *, export_size, zero_copy, task_status)
        serve_nbd plus the publisher, which stops when the connection ends.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import trio

from ...publish import STATS_INTERVAL, Publisher, source_stats
from ...status import SOURCE_STAT_KEYS
from ...status import summary  # noqa: F401 - moved to erofs_mount/status.py (shared with FUSE)
from .recovery import LocalRecord, Record, describe
from .server import ServerStats, serve_nbd


_SOURCE_KEYS = SOURCE_STAT_KEYS
_SERVER_KEYS = ("requests", "reads", "bytes_read", "read_errors", "refused")


def base_document(index: int, record: Record, source: Any, previous: dict | None) -> dict:
    """The fixed part of this daemon's document; ``previous``: the file a dead daemon left."""
    doc: dict[str, Any] = {"version": 1, "pid": os.getpid(), "index": index, "started": time.time(),
                           "source": describe(record)}
    if isinstance(record, LocalRecord):
        doc.update(kind="local", path=record.path)
    elif getattr(source, "etag", None) is not None:   # an S3 object
        doc.update(kind="s3", ref=str(source.ref), platform=None, manifest_digest=None, digest=source.pinned)
    else:
        doc.update(kind="oci", ref=str(source.ref), platform=source.platform, digest=source.digest,
                   manifest_digest=getattr(source, "manifest_digest", None))
    carried = {"bytes_fetched": 0, "retries": 0, "daemons": 0}
    if previous and previous.get("index") == index and previous.get("digest") == doc.get("digest"):
        before = previous.get("carried") or {}
        last = previous.get("stats") or {}
        for key in ("bytes_fetched", "retries"):
            carried[key] = _int(before.get(key)) + _int(last.get(key))
        carried["daemons"] = _int(before.get("daemons")) + 1
    doc["carried"] = carried
    return doc


def _int(value: Any) -> int:
    return value if isinstance(value, int) and value >= 0 else 0


def snapshot(base: dict, source: Any, server: ServerStats) -> dict:
    doc = dict(base)
    doc["updated"] = time.time()
    doc["stats"] = source_stats(source, _SOURCE_KEYS)
    doc["server"] = {k: getattr(server, k) for k in _SERVER_KEYS}
    return doc


async def _serve_then_cancel(scope: trio.CancelScope, sock: Any, source: Any, *, export_size: int,
                             zero_copy: str, task_status=trio.TASK_STATUS_IGNORED) -> ServerStats:
    try:
        return await serve_nbd(sock, source, export_size=export_size, zero_copy=zero_copy, task_status=task_status)
    finally:
        scope.cancel()  # the connection ended: stop publishing


async def serve_published(sock: Any, source: Any, base: dict, path: str, *, export_size: int, zero_copy: str,
                          interval: float = STATS_INTERVAL,
                          task_status=trio.TASK_STATUS_IGNORED) -> ServerStats:
    """``serve_nbd`` while ``path`` is rewritten every ``interval`` seconds."""
    async with trio.open_nursery() as nursery:
        stats = await nursery.start(functools.partial(
            _serve_then_cancel, nursery.cancel_scope, sock, source, export_size=export_size, zero_copy=zero_copy))
        task_status.started(stats)
        await Publisher(path, lambda: snapshot(base, source, stats)).run(interval)
    return stats
