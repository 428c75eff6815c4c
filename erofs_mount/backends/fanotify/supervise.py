"""Automatic reattach for fanotify mounts: a mount whose daemon died but whose holder lives (its
readers wait in the holder) gets a new daemon, as ``erofs-mount --reattach MNT`` would start.

    orphaned() -> list[dict]                    the records of such mounts
    supervise(poll=0.5, stop_after=None) -> int  the loop (``erofs-mount --supervise`` runs it,
                                                 beside the NBD supervisor when NBD is there)
"""

from __future__ import annotations

import errno
import logging
import time

from ...errors import ErofsMountError
from . import record

log = logging.getLogger("erofs_mount.fanotify.supervise")


def orphaned() -> list[dict]:
    out = []
    for doc in record.every():
        pids = doc.get("pids") or {}
        if (pids.get("holder") and record.alive(pids["holder"]) and not record.alive(pids.get("daemon"))
                and record.mounted(doc["mountpoint"], doc["data"])):
            out.append(doc)
    return out


def repair(doc: dict) -> bool:
    from .lifecycle import reattach

    try:
        reattach(doc["mountpoint"])
    except ErofsMountError as exc:
        log.error("%s: automatic reattach failed: %s", doc["mountpoint"], exc)
        return exc.errno != errno.EBUSY
    log.info("%s: reattached automatically", doc["mountpoint"])
    return True


def supervise(*, poll: float = 0.5, stop_after: float | None = None) -> int:
    deadline = None if stop_after is None else time.monotonic() + stop_after
    failures: dict[str, list[float]] = {}
    while deadline is None or time.monotonic() < deadline:
        for doc in orphaned():
            now = time.monotonic()
            recent = [t for t in failures.get(doc["mountpoint"], []) if now - t < 60]
            if len(recent) >= 5:      # a daemon that cannot start: not in a tight loop
                continue
            if not repair(doc):
                recent.append(now)
            failures[doc["mountpoint"]] = recent
        time.sleep(poll)
    return 0
