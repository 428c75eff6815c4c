"""Where a tar layer's index lives between mounts (sync file I/O; async callers use worker threads).

A layer read from a registry keeps its files in its blob-cache entry (``diskcache``), so the
cache's bound and eviction cover them::

    <root>/sha256/<hex>/tarindex.erofs   the EROFS tar index (metadata; data blocks address the tar)
    <root>/sha256/<hex>/tarindex.zinfo   tar+gzip: the gzip checkpoints (SOCI zinfo v2)
    <root>/sha256/<hex>/tarindex.tar     tar+zstd: the decompressed tar (one zstd frame has no
                                         random access: the stream itself is kept)
    <root>/sha256/<hex>/tarindex.verity  a registry layer (tar, tar+gzip): the dm-verity tree of the
                                         blob as stored, made by the indexing pass (its root hash
                                         is in the .json): checks every later ranged read of the blob
    <root>/sha256/<hex>/tarindex.json    written last: kind, sizes and the sha256 of each small file

A local layer file uses ``<root>/local/<key>/`` with the same names, ``key`` = sha256 of its path,
device, inode, size and mtime, so a changed file is indexed again.

Every file is written to a temporary name, fsynced and renamed; the ``.json`` goes last, so an
entry without it is incomplete and is rebuilt.  On reuse the sizes and the sha256 of the index and
zinfo are checked against the ``.json``; any mismatch throws the entry's index files away (one log
line) and the layer is indexed again.  The decompressed tar of a zstd layer is checked by size (it
is as large as the layer; hashing it at every mount would cost what indexing costs).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass

log = logging.getLogger("erofs_mount.sources.tarlayer")

FORMAT = 2      # 2: OCI whiteouts written as overlayfs ones
NAMES = ("tarindex.erofs", "tarindex.zinfo", "tarindex.tar", "tarindex.verity", "tarindex.json")


@dataclass(frozen=True)
class Stored:
    kind: str               # "tar", "gzip", "zstd"
    index: bytes            # the EROFS tar index
    tar_size: int           # bytes of the uncompressed tar stream
    zinfo: bytes | None     # gzip checkpoints
    tar_path: str | None    # zstd: the decompressed tar
    tree: tuple[bytes, bytes] | None = None   # (root hash, hash area) of the blob (verity/blobtree.py)


def digest_dir(root: str, digest: str) -> str:
    algo, _, hexpart = digest.partition(":")
    if algo != "sha256" or len(hexpart) != 64 or not all(c in "0123456789abcdef" for c in hexpart):
        raise ValueError(f"bad digest {digest!r}")
    return os.path.join(root, algo, hexpart)


def local_dir(root: str, path: str, st: os.stat_result) -> str:
    key = f"{os.path.realpath(path)}\0{st.st_dev}\0{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}"
    return os.path.join(root, "local", hashlib.sha256(key.encode()).hexdigest())


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def load(entry: str, *, kind: str, source_size: int, tree: bool = False) -> Stored | None:
    """The entry's index if complete and intact, else None (a damaged one is removed).  *tree*:
    the blob's dm-verity tree is needed too (an entry made without one is indexed again)."""
    meta_path = os.path.join(entry, "tarindex.json")
    try:
        with open(meta_path, "rb") as f:
            meta = json.loads(f.read(1 << 20))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        return _discard(entry, f"unreadable {meta_path}: {exc}")
    try:
        if meta.get("format") != FORMAT or meta.get("kind") != kind or meta.get("source_size") != source_size:
            return _discard(entry, f"{meta_path} is for another layer or format")
        with open(os.path.join(entry, "tarindex.erofs"), "rb") as f:
            index = f.read()
        if len(index) != meta["index_size"] or _sha(index) != meta["index_sha256"]:
            return _discard(entry, "the index does not match its checksum")
        zinfo = None
        if kind == "gzip":
            with open(os.path.join(entry, "tarindex.zinfo"), "rb") as f:
                zinfo = f.read()
            if len(zinfo) != meta["zinfo_size"] or _sha(zinfo) != meta["zinfo_sha256"]:
                return _discard(entry, "the gzip checkpoints do not match their checksum")
        tar_path = None
        if kind == "zstd":
            tar_path = os.path.join(entry, "tarindex.tar")
            if os.stat(tar_path).st_size != meta["tar_size"]:
                return _discard(entry, "the decompressed tar has the wrong size")
        blob_tree = None
        if tree:
            if "tree_root" not in meta:
                return _discard(entry, "no dm-verity tree of the blob (made by an older version)")
            with open(os.path.join(entry, "tarindex.verity"), "rb") as f:
                area = f.read()
            if len(area) != meta["tree_size"] or _sha(area) != meta["tree_sha256"]:
                return _discard(entry, "the blob's dm-verity tree does not match its checksum")
            blob_tree = (bytes.fromhex(meta["tree_root"]), area)
        return Stored(kind, index, int(meta["tar_size"]), zinfo, tar_path, blob_tree)
    except (OSError, KeyError, TypeError, ValueError) as exc:
        return _discard(entry, f"incomplete entry: {exc}")


def _discard(entry: str, why: str) -> None:
    log.warning("tar index cache %s: %s; indexing again", entry, why)
    remove(entry)
    return None


def remove(entry: str) -> None:
    for name in NAMES:
        try:
            os.unlink(os.path.join(entry, name))
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("tar index cache: cannot remove %s: %s", os.path.join(entry, name), exc.strerror)


def write_file(entry: str, name: str, data: bytes) -> None:
    """Atomically: temp file, fsync, rename."""
    os.makedirs(entry, mode=0o700, exist_ok=True)
    path = os.path.join(entry, name)
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)


def save(entry: str, *, kind: str, source_size: int, index: bytes, tar_size: int, zinfo: bytes | None,
         tree: tuple[bytes, bytes] | None = None) -> None:
    """Write the index (zinfo, the blob's tree) then the ``.json`` that makes the entry complete.
    The zstd decompressed tar must already be at ``tarindex.tar`` (written through ``TarSpill``)."""
    write_file(entry, "tarindex.erofs", index)
    meta = {"format": FORMAT, "kind": kind, "source_size": source_size, "tar_size": tar_size,
            "index_size": len(index), "index_sha256": _sha(index)}
    if zinfo is not None:
        write_file(entry, "tarindex.zinfo", zinfo)
        meta.update(zinfo_size=len(zinfo), zinfo_sha256=_sha(zinfo))
    if tree is not None:
        root, area = tree
        write_file(entry, "tarindex.verity", area)
        meta.update(tree_root=root.hex(), tree_size=len(area), tree_sha256=_sha(area))
    write_file(entry, "tarindex.json", json.dumps(meta, sort_keys=True).encode())


class TarSpill:
    """The decompressed tar of a zstd layer, written while indexing: ``tarindex.tar.tmpPID`` until
    ``commit()`` fsyncs and renames it; ``discard()`` removes it (a failed pass leaves nothing)."""

    def __init__(self, entry: str) -> None:
        os.makedirs(entry, mode=0o700, exist_ok=True)
        self.path = os.path.join(entry, "tarindex.tar")
        self.tmp = f"{self.path}.tmp{os.getpid()}"
        self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        self.size = 0

    def write(self, data) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
            self.size += n

    def commit(self) -> str:
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        os.rename(self.tmp, self.path)
        return self.path

    def discard(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        try:
            os.unlink(self.tmp)
        except FileNotFoundError:
            pass
