"""``erofs-mount status`` for FUSE mounts.

    status_entries() -> list[dict]   every FUSE mount erofs-mount serves (mount table + published documents):
        mountpoint, kind ("oci"|"s3"|"local"), source, ref, platform, digest (the layer blob served),
        pinned_ref / manifest_digest (OCI: what the ref resolved to), pid, alive, uid, published,
        and ``erofs_mount.status.summary`` (bytes_fetched, cache_hit_ratio, retries, ...)
    status(out=None) -> int          one line per mount (or "no FUSE mounts ..."); 0
    python -m erofs_mount.backends.fuse.status [--json]

A mount is ours when the mount table shows ``fuse.erofs`` (our subtype) or a document names its
mount point and mount id.  Root also reads the documents of the users whose mounts it sees
(``user_id=`` in the mount's options: their ``/run/user/UID`` or XDG state dir).
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import sys

from ...status import hosts_text, ratio_text, size_text, summary, verity_text
from . import publish
from .mountinfo import MountEntry, parse_mountinfo


def _mounts(mountinfo: str) -> list[MountEntry]:
    try:
        with open(mountinfo, encoding="utf-8", errors="surrogateescape") as f:
            return [e for e in parse_mountinfo(f.read()) if e.fstype == "fuse" or e.fstype.startswith("fuse.")]
    except OSError:
        return []


def _user_id(entry: MountEntry) -> int | None:
    for opt in entry.super_options.split(","):
        if opt.startswith("user_id="):
            try:
                return int(opt[8:])
            except ValueError:
                return None
    return None


def _doc_dirs(mounts: list[MountEntry]) -> list[str]:
    dirs = [publish.stats_dir()]
    if os.geteuid() == 0:
        dirs.append(publish.ROOT_DIR)
        for uid in sorted({u for u in map(_user_id, mounts) if u not in (None, 0)}):
            try:
                home = pwd.getpwuid(uid).pw_dir
            except KeyError:
                continue
            dirs += publish.user_dirs({}, home, uid)
    out = []
    for d in dirs:
        if d not in out:
            out.append(d)
    return out


def _documents(dirs: list[str]) -> dict[str, dict]:
    """mountpoint -> the newest document naming it."""
    docs: dict[str, dict] = {}
    for d in dirs:
        for path in sorted(glob.glob(os.path.join(glob.escape(d), "*.json"))):
            doc = publish.read_json(path)
            if not doc or not isinstance(doc.get("mountpoint"), str):
                continue
            old = docs.get(doc["mountpoint"])
            if old is None or (doc.get("started") or 0) > (old.get("started") or 0):
                docs[doc["mountpoint"]] = doc
    return docs


def status_entries(mountinfo: str = "/proc/self/mountinfo") -> list[dict]:
    mounts = _mounts(mountinfo)
    docs = _documents(_doc_dirs(mounts))
    out = []
    for m in mounts:
        doc = docs.get(m.mountpoint)
        if doc is not None and doc.get("mount_id") not in (None, m.mount_id):
            doc = None  # a document of an earlier mount on the same path
        if doc is None and m.fstype != "fuse.erofs":
            continue
        e: dict = {"mountpoint": m.mountpoint, "mount_id": m.mount_id, "fstype": m.fstype, "uid": _user_id(m),
                   "kind": "local", "source": m.source, "ref": None, "platform": None, "digest": None,
                   "pid": None, "alive": None, "published": doc is not None}
        if doc is not None:
            e.update(kind=doc.get("kind", "local"), source=doc.get("source") or m.source, pid=doc.get("pid"),
                     alive=publish.daemon_alive(doc), uid=doc.get("uid", e["uid"]))
            if e["kind"] in ("oci", "s3"):
                e.update(ref=doc.get("ref"), platform=doc.get("platform"), digest=doc.get("digest"),
                         pinned_ref=doc.get("pinned_ref"), manifest_digest=doc.get("manifest_digest"))
        e.update(summary(doc))
        out.append(e)
    return out


def status_line(e: dict) -> str:
    parts = [f"fuse {e['mountpoint']}"]
    if e["kind"] == "oci":
        parts += [f"ref={e['ref']}", f"platform={e['platform'] or '-'}", f"digest={e['digest'] or '-'}"]
    elif e["kind"] == "s3":
        parts += [f"source={e['ref']}", f"pinned={e['digest'] or '-'}"]
    else:
        parts.append(f"source={e['source']}")
    alive = {True: "alive", False: "dead", None: "unknown"}[e["alive"]]
    parts += [f"pid={e['pid'] or '-'}", f"daemon={alive}"]
    if e["published"]:
        parts.append(f"bytes_fetched={size_text(e['bytes_fetched'])}")
        if e["kind"] in ("oci", "s3"):
            parts += [f"cache_hit_ratio={ratio_text(e['cache_hit_ratio'])}", f"retries={e['retries']}"]
        parts.append(verity_text(e.get("verity")) + hosts_text(e.get("hosts")))
    return " ".join(parts)


def status(out=None) -> int:
    out = out or sys.stdout
    entries = status_entries()
    for e in entries:
        print(status_line(e), file=out)
    if not entries:
        print("no FUSE mounts served by erofs-mount", file=out)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--json"]:
        json.dump(status_entries(), sys.stdout, indent=1, sort_keys=True)
        print()
        return 0
    return status()


if __name__ == "__main__":
    sys.exit(main())
