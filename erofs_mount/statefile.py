"""Small JSON state files the daemons publish for ``erofs-mount status`` (NBD and FUSE alike)."""

from __future__ import annotations

import json
import os


def write_json(path: str, doc: dict, *, make_dir: bool = False) -> None:
    """Atomically (temp file + rename), mode 0600; ``make_dir`` creates the directory 0700 first.
    No fsync: a lost update only costs freshness."""
    if make_dir:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, json.dumps(doc, sort_keys=True).encode())
    finally:
        os.close(fd)
    os.rename(tmp, path)


def read_json(path: str) -> dict | None:
    """The document, or None when absent or unreadable (a status display must not fail on it)."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.loads(f.read(1 << 20))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None
