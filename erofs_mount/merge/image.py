"""``MergedImage``: the layers of an image as one read-only tree, with the ``erofs.image.Image`` interface.

The FUSE operations (backends/fuse), ``extract`` and the tools take it in place of an ``Image``.
The rules are :mod:`.core`'s; this module reads the layers lazily and caches:

* a directory is merged when it is first listed, looked up in, or stat'ed (its nlink counts the
  merged subdirectories): only its components are read, topmost first, down to the first opaque
  one.  Looking up ``/a/b`` reads the root of every layer, then ``/a`` only in the layers whose
  merge gives ``/a`` a component, and so on;
* merged listings are kept in an LRU bounded by the names they hold (``listing_cache``, default
  131,072 names, ~200 bytes each for 13-byte names: ~26 MB); the one just computed is kept even if
  larger;
* every merged directory met (a subdirectory of a merged listing) keeps one record, ``nid ->
  (parent nid, its components)``, for as long as the image is open (~250 bytes a directory; a
  directory's components cannot be found again from its number alone): bounded by the image's
  directory count, not its file count;
* merged ``Inode`` records (the layer's record with the merged nid, and a directory's nlink) in
  an LRU of ``inode_cache`` (default 16,384) entries.  The layers keep their own caches.

Attributes: a directory's mode, owner, times, size, blocks and xattrs are its topmost component's,
its nlink is 2 + the merged subdirectories; anything else is its owner layer's inode as it is,
nlink included (a hard link whited out by an upper layer still counts: finding that would need
every directory of the layer).  ``trusted.overlay.*`` and ``user.overlay.*`` xattrs are hidden.
Readdir positions (``DirEntry.next_pos``): ``.`` 1, ``..`` 2, merged name i (from 0, sorted bytewise) i + 3;
deterministic, so stable for the image's lifetime.  statfs: the layers' bytes added up in the
merged block size (the largest of the layers'), ``f_files`` 2^64-1 as the kernel reports
EROFS, ``f_ffree`` less the layers' inode counts.

Thread-safe like ``Image``: caches are guarded by one lock and hold immutable values; two threads
may merge the same directory at once (the same result; one is kept).
"""

from __future__ import annotations

import dataclasses
import stat
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

from ..erofs import layout as L
from ..erofs.dirent import DirEntry
from ..erofs.image import LRU, Image, resolve_path
from ..erofs.inode import Inode
from ..errors import CorruptedError, NoDataError, NotADirError, NotFoundError
from .core import (Listing, check_layer_count, decode_nid, encode_nid, fold_nid, is_opaque_xattrs,
                   is_private_xattr, merge_dir, merged_superblock, unfold_ino)

LISTING_CACHE = 131072      # names held by the cached merged listings
INODE_CACHE = 16384         # merged Inode records


class _Component:
    """One layer's version of a merged directory (``core.Component``)."""

    __slots__ = ("merged", "layer", "img", "nid")

    def __init__(self, merged: MergedImage, code: int) -> None:
        self.merged = merged
        self.layer, self.nid = merged.layer_of(code)
        self.img = merged.layers[self.layer]

    def opaque_attr(self) -> bool:
        return is_opaque_xattrs(self.img.xattr_items(self.nid))

    def entries(self) -> Iterator[tuple[bytes, int, int]]:
        code, layer = self.merged._code, self.layer
        for e in self.img.iterdir(self.nid):
            try:
                nid = code(layer, e.nid)
            except CorruptedError:      # a nid beyond the numbering: no inode there could be read anyway
                continue
            yield e.name, nid, e.file_type

    def is_whiteout(self, nid: int) -> bool:
        ino = self.img.inode(self.merged.layer_of(nid)[1])
        return stat.S_ISCHR(ino.mode) and ino.rdev == 0


class MergedImage:
    """Layers (``Image`` objects, bottom first, as in the manifest) merged; upper layers win."""

    def __init__(self, layers: Sequence[Image], *, listing_cache: int = LISTING_CACHE,
                 inode_cache: int = INODE_CACHE) -> None:
        check_layer_count(len(layers))
        self.layers: list[Image] = list(layers)
        self._metabox = [bool(img.sb.has_metabox) for img in self.layers]
        top = len(self.layers) - 1
        self.root_nid = self._code(top, self.layers[top].root_nid)
        self.block_size = max(img.block_size for img in self.layers)
        total = sum((img.sb.blocks + sum(d.blocks for d in img.sb.devices)) * img.block_size for img in self.layers)
        self.sb = merged_superblock([img.sb for img in self.layers], self.root_nid,
                                    self.block_size.bit_length() - 1, -(-total // self.block_size))
        sizes = [img.size for img in self.layers]
        self.size: int | None = None if None in sizes else sum(sizes)
        self._lock = threading.Lock()
        roots = tuple(self._code(i, self.layers[i].root_nid) for i in range(top, -1, -1))
        self._dirs: dict[int, tuple[int, tuple[int, ...]]] = {self.root_nid: (self.root_nid, roots)}
        self._listings: OrderedDict[int, Listing] = OrderedDict()
        self._listed = 0                    # names held by _listings
        self._listing_cache = listing_cache
        self._inodes = LRU(inode_cache)
        self._zreader: _ZReaders | None = None

    # ------------------------------------------------------------------ numbering
    def _code(self, layer: int, nid: int) -> int:
        return encode_nid(layer, fold_nid(nid, self._metabox[layer]))

    def layer_of(self, nid: int) -> tuple[int, int]:
        """``(layer index, nid in that layer)`` of a merged nid (a directory: its topmost component)."""
        layer, key = decode_nid(nid, len(self.layers))
        return layer, unfold_ino(key, self._metabox[layer])

    def _owner(self, nid: int) -> tuple[Image, int]:
        layer, lnid = self.layer_of(nid)
        return self.layers[layer], lnid

    def st_ino(self, nid: int) -> int:
        """The merged nid is the inode number (the merged view has no metabox to fold)."""
        return nid

    # ------------------------------------------------------------------ directories
    def components(self, nid: int) -> tuple[int, ...]:
        """The merged nids of directory ``nid``'s components, topmost first, before the opaque cut."""
        return self._dir_record(nid)[1]

    def _dir_record(self, nid: int) -> tuple[int, tuple[int, ...]]:
        with self._lock:
            rec = self._dirs.get(nid)
        if rec is not None:
            return rec
        img, lnid = self._owner(nid)
        if not img.inode(lnid).is_dir:
            raise NotADirError(f"inode {nid} is not a directory")
        # a directory number not met through a merged listing (a caller made it up): it stands
        # for its own layer's directory alone
        with self._lock:
            return self._dirs.setdefault(nid, (nid, (nid,)))

    def listing(self, nid: int) -> Listing:
        """The merged listing of directory ``nid`` (merged on first use, then cached)."""
        with self._lock:
            hit = self._listings.get(nid)
            if hit is not None:
                self._listings.move_to_end(nid)
                return hit
        _parent, comps = self._dir_record(nid)
        listing = merge_dir(_Component(self, c) for c in comps)
        with self._lock:
            for name, sub in listing.subdirs.items():
                self._dirs.setdefault(sub[0], (nid, sub))
            listing.subdirs = {}        # the components live in _dirs now
            old = self._listings.pop(nid, None)
            if old is not None:
                self._listed -= len(old.names)
            self._listings[nid] = listing
            self._listed += len(listing.names)
            while self._listed > self._listing_cache and len(self._listings) > 1:
                _k, gone = self._listings.popitem(last=False)
                self._listed -= len(gone.names)
        return listing

    def iterdir(self, nid: int, pos: int = 0) -> Iterator[DirEntry]:
        """Entries from position ``pos``: ``.`` (next position 1), ``..`` (2), then the merged names
        sorted bytewise, name i (from 0) with next position i + 3."""
        listing = self.listing(nid)
        pos = max(pos, 0)
        if pos < 1:
            yield DirEntry(name=b".", nid=nid, file_type=L.EROFS_FT_DIR, next_pos=1)
        if pos < 2:
            yield DirEntry(name=b"..", nid=self._dir_record(nid)[0], file_type=L.EROFS_FT_DIR, next_pos=2)
        names, entries = listing.names, listing.entries
        for i in range(max(pos - 2, 0), len(names)):
            name = names[i]
            child, ftype = entries[name]
            yield DirEntry(name=name, nid=child, file_type=ftype, next_pos=i + 3)

    def lookup(self, nid: int, name: bytes) -> int:
        """nid of ``name`` in merged directory ``nid`` (``.`` and ``..`` too, as ``Image.lookup``)."""
        hit = self.listing(nid).entries.get(name)
        if hit is None and name in (b".", b".."):
            return nid if name == b"." else self._dir_record(nid)[0]
        if hit is None:
            raise NotFoundError(f"{name.decode('utf-8', 'surrogateescape')}: no such file or directory")
        return hit[0]

    def resolve(self, path: str | bytes) -> int:
        """nid of an absolute path in the merged tree (symlinks are not followed)."""
        return resolve_path(self, path)

    # ------------------------------------------------------------------ inodes
    def inode(self, nid: int) -> Inode:
        with self._lock:
            hit = self._inodes.get(nid)
        if hit is not None:
            return hit
        img, lnid = self._owner(nid)
        ino = img.inode(lnid)
        if ino.is_dir:
            ino = dataclasses.replace(ino, nid=nid, nlink=2 + self.listing(nid).nsubdirs)
        else:
            ino = dataclasses.replace(ino, nid=nid)
        with self._lock:
            self._inodes.put(nid, ino)
        return ino

    # ------------------------------------------------------------------ data: the owner layer's
    def read(self, nid: int, offset: int, length: int) -> bytes:
        img, lnid = self._owner(nid)
        return img.read(lnid, offset, length)

    def read_into(self, nid: int, offset: int, length: int, buf) -> int:
        img, lnid = self._owner(nid)
        return img.read_into(lnid, offset, length, buf)

    def readlink(self, nid: int) -> bytes:
        img, lnid = self._owner(nid)
        return img.readlink(lnid)

    def data_pieces(self, nid: int, offset: int = 0, length: int | None = None
                    ) -> Iterator[tuple[int, int, Any | None, int]]:
        img, lnid = self._owner(nid)
        return img.data_pieces(lnid, offset, length)

    # ------------------------------------------------------------------ xattrs (overlay ones hidden)
    def xattr_items(self, nid: int) -> list[tuple[bytes, bytes]]:
        img, lnid = self._owner(nid)
        return [(n, v) for n, v in img.xattr_items(lnid) if not is_private_xattr(n)]

    def xattrs(self, nid: int) -> dict[bytes, bytes]:
        return dict(self.xattr_items(nid))

    def listxattr(self, nid: int) -> list[bytes]:
        return [n for n, _ in self.xattr_items(nid)]

    def getxattr(self, nid: int, name: bytes) -> bytes:
        if is_private_xattr(name):
            raise NoDataError(f"no xattr {name.decode('utf-8', 'replace')}")
        img, lnid = self._owner(nid)
        return img.getxattr(lnid, name)

    # ------------------------------------------------------------------ filesystem
    @property
    def zreader(self) -> _ZReaders:
        if self._zreader is None:
            self._zreader = _ZReaders(self)
        return self._zreader

    def zstats(self) -> dict:
        out: dict = {}
        for img in self.layers:
            for k, v in img.zstats().items():
                if isinstance(v, int) and not isinstance(v, bool):
                    out[k] = out.get(k, 0) + v
        return out

    def statfs(self) -> dict[str, int]:
        files = (1 << 64) - 1
        return {"f_bsize": self.block_size, "f_frsize": self.block_size, "f_blocks": self.sb.blocks, "f_bfree": 0,
                "f_bavail": 0, "f_files": files, "f_ffree": files - self.sb.inos, "f_namemax": L.EROFS_NAME_LEN}

    @staticmethod
    def is_dir_mode(mode: int) -> bool:
        return stat.S_ISDIR(mode)


class _ZReaders:
    """``image.zreader`` of a merged image: each compressed file is read by its layer's reader;
    ``cache_limit`` is the layers' decoded-pcluster caches together (set: shared out evenly)."""

    def __init__(self, merged: MergedImage) -> None:
        self._m = merged
        self._compressed = [img for img in merged.layers if img.sb.marks_compression
                            or img.sb.has_incompat(L.EROFS_FEATURE_INCOMPAT_COMPR_CFGS)]

    @property
    def cfgs(self):
        from ..erofs.compr_cfgs import ComprCfgs
        algs = 0
        for img in self._compressed:
            algs |= img.zreader.cfgs.available_compr_algs
        return ComprCfgs(available_compr_algs=algs, zero_padding=False)

    @property
    def cache_limit(self) -> int:
        return sum(img.zreader.cache_limit for img in self._compressed)

    @cache_limit.setter
    def cache_limit(self, total: int) -> None:
        for img in self._compressed:
            img.zreader.cache_limit = max(total // len(self._compressed), 1 << 20)

    def read(self, inode: Inode, offset: int, length: int, sink=None):
        img, lnid = self._m._owner(inode.nid)
        return img.zreader.read(img.inode(lnid), offset, length, sink)

    def extents(self, inode: Inode):
        img, lnid = self._m._owner(inode.nid)
        return img.zreader.extents(img.inode(lnid))

    def stats(self) -> dict:
        return self._m.zstats()


def merged_paths(merged: MergedImage, top: str = "/") -> dict[str, tuple[int, int]]:
    """Every path of the merged tree under ``top`` -> ``(layer, nid in that layer)`` of its owner
    (a directory: its topmost component).  Depth first with an explicit stack; a directory met
    twice (a cycle in a damaged layer) is not entered again."""
    start = merged.resolve(top)
    root = "/" + top.strip("/") if top.strip("/") else "/"
    out = {root: merged.layer_of(start)}
    seen = {start}
    stack = [(start, root)]
    while stack:
        nid, path = stack.pop()
        for e in merged.iterdir(nid):
            if e.name in (b".", b".."):
                continue
            child = path.rstrip("/") + "/" + e.name.decode("utf-8", "surrogateescape")
            out[child] = merged.layer_of(e.nid)
            if e.file_type == L.EROFS_FT_DIR and e.nid not in seen:
                seen.add(e.nid)
                stack.append((e.nid, child))
    return out
