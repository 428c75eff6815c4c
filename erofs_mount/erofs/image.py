"""The Image facade: stat, lookup, iterdir, readlink, xattrs and reads over a positional reader.

Pure: every byte comes from ``read_at(offset, length)`` callables (the primary
device and any extra devices); nothing here opens files or sockets.  Instances
are safe to share between threads (the FUSE backend reads from worker threads):
caches are guarded by one lock and hold immutable values.
"""

from __future__ import annotations

import errno
import inspect
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from ..errors import (CorruptedError, NoDataError, NotADirError, NotFoundError, ShortReadError, SourceError,
                      UnsupportedError)
from . import layout as L
from .dirent import DirEntry, entries_from, lookup_blocks, parse_block
from .inode import Inode, iloc, parse_inode
from .map import EROFS_MAP_MAPPED, EROFS_MAP_META, map_blocks
from .superblock import Superblock, parse_device_table, parse_superblock
from .xattr import (POSIX_ACL_NAMES, XATTR_NAME_CAPS, capability_value, filtered_out, name_filter,
                    parse_prefix_table, posix_acl_value, read_xattrs)

ReadAt = Callable[[int, int], bytes]
_HEAD_SIZE = 4096  # the superblock's block for the usual block sizes; a larger one is read whole
_BLKSZBITS_AT = L.EROFS_SUPER_OFFSET + 12  # struct erofs_super_block.blkszbits


def as_read_at(src: Any) -> ReadAt:
    """Accept a ``read_at(offset, length)`` callable or an object with a sync ``pread``/``read_at``."""
    fn = getattr(src, "pread", None)
    if fn is None:
        fn = getattr(src, "read_at", None)
        if fn is not None and inspect.iscoroutinefunction(fn):
            raise TypeError(f"{src!r}: read_at is async; wrap it in a sync bridge (sources.SyncReadAt)")
    if fn is None and callable(src):
        fn = src
    if fn is None:
        raise TypeError(f"{src!r} has no read_at(offset, length)")
    return fn


class LRU:
    """A bounded least-recently-used mapping (callers hold their own lock)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.data: OrderedDict = OrderedDict()

    def get(self, key):
        v = self.data.get(key)
        if v is not None:
            self.data.move_to_end(key)
        return v

    def put(self, key, value) -> None:
        self.data[key] = value
        self.data.move_to_end(key)
        while len(self.data) > self.capacity:
            self.data.popitem(last=False)


class Image:
    def __init__(self, source: Any, *, size: int | None = None, devices: Sequence[Any] = (),
                 inode_cache: int = 65536, block_cache: int = 1024) -> None:
        self._read_at = as_read_at(source)
        if size is None:
            size = getattr(source, "size", None)
        self.size: int | None = size
        self._devices = [as_read_at(d) for d in devices]
        self._sources = [source, *devices]
        # only the superblock's block: a read of more could take in blocks a verified source
        # (verity/source.py) refuses, and fail a mount over one damaged file
        head = self._read_at(0, _HEAD_SIZE)
        if len(head) > _BLKSZBITS_AT and 12 < head[_BLKSZBITS_AT] <= 16:
            head = self._read_at(0, 1 << head[_BLKSZBITS_AT])
        sb = parse_superblock(head)
        self.block_size = sb.block_size
        if sb.extra_devices:
            table = self._read_at(sb.devt_slotoff * L.EROFS_DEVT_SLOT_SIZE,
                                  sb.extra_devices * L.EROFS_DEVT_SLOT_SIZE)
            sb = _with_devices(sb, parse_device_table(sb, table))
        if len(self._devices) > sb.extra_devices:
            raise UnsupportedError(f"{len(self._devices)} extra devices given but the image has "
                                   f"{sb.extra_devices}")
        self.sb: Superblock = sb
        self.root_nid = sb.root_nid
        self._device_id_mask = (1 << (sb.extra_devices).bit_length()) - 1 if sb.extra_devices else 0
        self._lock = threading.Lock()
        self._inodes = LRU(inode_cache)
        self._blocks = LRU(block_cache)   # metadata blocks
        self._dirblocks = LRU(block_cache)  # parsed directory blocks
        self._xattrs = LRU(4096)
        self._zreader = None
        self._prefixes: list[bytes] | None = None
        if sb.has_incompat(L.EROFS_FEATURE_INCOMPAT_COMPR_CFGS) or sb.has_metabox:
            self.zreader  # parse the compression configuration now: unknown algorithms refuse the image
        # the root inode must be readable for the image to be usable at all
        if not self.inode(self.root_nid).is_dir:
            raise CorruptedError(f"root inode {self.root_nid} is not a directory")

    # ------------------------------------------------------------------ raw access
    @property
    def zreader(self):
        if self._zreader is None:
            try:
                from .zdata import ZReader
            except ImportError:  # pragma: no cover - until compression support lands
                raise UnsupportedError("compressed data not yet supported") from None
            self._zreader = ZReader(self)
        return self._zreader

    def read_raw(self, pos: int, length: int, device: int = 0) -> bytes:
        """Raw bytes of a device (0 = primary) at byte position ``pos``."""
        if length <= 0:
            return b""
        reader = self._read_at if device == 0 else self._devices[device - 1]
        return reader(pos, length)

    def _read_meta_block(self, blk: int, in_mbox: bool) -> bytes:
        key = (blk, in_mbox)
        with self._lock:
            data = self._blocks.get(key)
        if data is None:
            bs = self.block_size
            if in_mbox:
                try:
                    data = self.read(self.sb.metabox_nid, blk * bs, bs)
                except CorruptedError as exc:   # metadata: the kernel reports EUCLEAN here, not read's EIO
                    raise CorruptedError(str(exc)) from None
                data = data.ljust(bs, b"\0")     # past the metabox's i_size the page cache holds zeros
            else:
                data = self.read_raw(blk * bs, bs)
                if len(data) < bs and self.size is not None:
                    # the kernel reads metadata through the block device's page cache, where
                    # anything past the end of the device reads as zeros (fs/buffer.c
                    # block_read_full_folio): e.g. shared xattr ids pointing past the end
                    data = data.ljust(bs, b"\0")
            with self._lock:
                self._blocks.put(key, data)
        return data

    def read_meta(self, pos: int, length: int, in_metabox: bool = False) -> bytes:
        """Metadata bytes: the primary device, or the metabox inode's data."""
        bs = self.block_size
        blk, off = divmod(pos, bs)
        if 0 < length <= bs - off:     # within one block: the common case (an inode, an index)
            return self._read_meta_block(blk, in_metabox)[off:off + length]
        out = []
        while length > 0:
            blk, off = divmod(pos, bs)
            data = self._read_meta_block(blk, in_metabox)
            piece = data[off:off + length]
            if not piece:
                break
            out.append(piece)
            pos += len(piece)
            length -= len(piece)
            if len(data) < bs:
                break
        return b"".join(out)

    def _locate(self, device: int, pa: int) -> tuple[int, int, int | None]:
        """(device to read, position there, missing device it stands for) — the kernel's ``erofs_map_dev``.

        A device that was not given but has a unified address is read from the primary ("flat"
        images: the device's blocks follow the primary); the third value then names it, so a
        short read can say which ``--device`` is missing.
        """
        slots = self.sb.devices
        if device:
            if device > len(slots):
                raise CorruptedError(f"device id {device} beyond the {len(slots)} extra devices")
            if device <= len(self._devices):
                return device, pa, None
            slot = slots[device - 1]
            if slot.uniaddr:
                return 0, pa + slot.uniaddr * self.block_size, device
            raise self._missing_device(device)
        for i, slot in enumerate(slots):
            start = slot.uniaddr * self.block_size
            if slot.uniaddr and start <= pa < start + slot.blocks * self.block_size:
                return (i + 1, pa - start, None) if i < len(self._devices) else (0, pa, i + 1)
        return 0, pa, None

    def read_mapped(self, device: int, pa: int, length: int) -> bytes:
        """Bytes at physical address ``pa`` of on-disk device ``device`` (0 = primary), mapped like the kernel."""
        dev, pos, stands_for = self._locate(device, pa)
        data = self.read_raw(pos, length, dev)
        if stands_for is not None and len(data) < length:
            raise self._missing_device(stands_for)
        return data

    def data_pieces(self, nid: int, offset: int = 0, length: int | None = None
                    ) -> Iterator[tuple[int, int, Any | None, int]]:
        """``(offset, length, source, position)`` pieces of an uncompressed file's data.

        ``source`` is the object given for that device (so a caller may copy the bytes
        without them passing through Python, e.g. ``os.sendfile`` from its ``fileno()``)
        with the bytes at ``position``; ``None`` for holes, inline tails and compressed data:
        read those pieces with :meth:`read`.
        """
        inode = self.inode(nid)
        end = inode.size if length is None else min(inode.size, offset + length)
        if inode.is_compressed:
            if offset < end:
                yield offset, end - offset, None, 0
            return
        pos = offset
        while pos < end:
            ext = map_blocks(self.sb, inode, pos, self.read_meta, self._device_id_mask)
            n = min(end, ext.la + ext.llen) - pos
            if n <= 0:
                raise CorruptedError(f"inode {nid}: empty extent at {pos}")
            if ext.flags & EROFS_MAP_MAPPED:
                dev, where, stands_for = self._locate(ext.device, ext.pa + pos - ext.la)
                yield pos, n, (self._sources[dev] if stands_for is None else None), where
            else:
                yield pos, n, None, 0
            pos += n

    def _missing_device(self, device: int) -> SourceError:
        tag = self.sb.devices[device - 1].tag.decode("latin-1") or "untagged"
        return SourceError(f"data on extra device {device} ({tag}) but no --device was given for it")

    # ------------------------------------------------------------------ inodes
    def inode(self, nid: int) -> Inode:
        with self._lock:
            ino = self._inodes.get(nid)
        if ino is not None:
            return ino
        loc = iloc(self.sb, nid)
        pos, in_mbox = loc
        if not in_mbox and self.size is not None and pos + L.INODE_COMPACT.size > self.size:
            raise CorruptedError(f"nid {nid} out of range (inode at byte {pos}, image is {self.size} bytes)")
        raw = self.read_meta(pos, L.INODE_EXTENDED.size, in_mbox)
        if len(raw) < L.INODE_COMPACT.size:
            raise ShortReadError(f"nid {nid}: inode at byte {pos} is past the end of the image")
        ino = parse_inode(self.sb, nid, raw, loc)
        with self._lock:
            self._inodes.put(nid, ino)
        return ino

    def st_ino(self, nid: int) -> int:
        """The inode number the kernel reports for ``nid`` (``st_ino``, ``d_ino``).

        The on-disk nid, except on metabox images, where the kernel moves the metabox flag
        (nid bit 63) to bit 31 and shifts nid bits 31..62 up by one so inode numbers stay
        small (fs/erofs/internal.h ``erofs_nid_to_ino64``).
        """
        if not self.sb.has_metabox:
            return nid
        hi = (nid << 1) & (((1 << 64) - 1) ^ ((1 << 32) - 1))
        return hi | (nid & ((1 << 31) - 1)) | ((nid >> L.EROFS_DIRENT_NID_METABOX_BIT) << 31)

    # ------------------------------------------------------------------ data
    def read_into(self, nid: int, offset: int, length: int, buf) -> int:
        """``read`` into the writable buffer ``buf`` (room for ``length`` bytes); the count written.
        Compressed data is decoded straight into it (no joined copy: the FUSE decoder process
        fills its shared slots this way)."""
        inode = self.inode(nid)
        if inode.is_compressed and offset >= 0 and length >= 0:
            return self.zreader.read(inode, offset, length, buf)
        data = self.read(nid, offset, length)
        buf[:len(data)] = data
        return len(data)

    def read(self, nid: int, offset: int, length: int) -> bytes:
        """``length`` bytes of the inode's data from ``offset`` (short only at EOF)."""
        inode = self.inode(nid)
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        if offset >= inode.size or length == 0:
            return b""
        length = min(length, inode.size - offset)
        if inode.is_compressed:
            return self.zreader.read(inode, offset, length)
        out = []
        pos, end = offset, offset + length
        while pos < end:
            try:
                ext = map_blocks(self.sb, inode, pos, self.read_meta, self._device_id_mask)
            except CorruptedError as exc:
                # the kernel maps file data while filling the page cache, and a failed fill
                # reaches read(2) as EIO (mm/filemap.c filemap_read_folio: folio not uptodate)
                raise CorruptedError(str(exc), errno=errno.EIO) from None
            n = min(end, ext.la + ext.llen) - pos
            if n <= 0:
                raise CorruptedError(f"inode {nid}: empty extent at {pos}")
            skip = pos - ext.la
            if ext.flags & EROFS_MAP_META:
                data = self.read_meta(ext.pa + skip, n, inode.in_metabox)
            elif ext.flags & EROFS_MAP_MAPPED:
                data = self.read_mapped(ext.device, ext.pa + skip, n)
            else:
                data = bytes(n)
            if len(data) != n:
                raise ShortReadError(f"inode {nid}: short read at offset {pos} ({len(data)} of {n} bytes)")
            out.append(data)
            pos += n
        return out[0] if len(out) == 1 else b"".join(out)

    def readlink(self, nid: int) -> bytes:
        inode = self.inode(nid)
        if not inode.is_lnk:
            raise CorruptedError(f"inode {nid} is not a symlink")
        data = self.read(nid, 0, inode.size)
        # the kernel keeps the target as a C string (fs/erofs/inode.c erofs_fill_symlink:
        # kmemdup_nul; page_get_link + nd_terminate_link otherwise) and readlink(2) copies
        # strlen() bytes: a NUL ends the target, and an empty target reads as ""
        return data.split(b"\0", 1)[0]

    # ------------------------------------------------------------------ directories
    def _dir_block(self, inode: Inode, blk: int) -> tuple[bytes, list]:
        key = (inode.nid, blk)
        with self._lock:
            hit = self._dirblocks.get(key)
        if hit is not None:
            return hit
        bs = self.block_size
        data = self.read(inode.nid, blk * bs, min(bs, inode.size - blk * bs))
        hit = (data, parse_block(data, inode.nid, blk * bs))
        with self._lock:
            self._dirblocks.put(key, hit)
        return hit

    def _dir_inode(self, nid: int) -> Inode:
        inode = self.inode(nid)
        if not inode.is_dir:
            raise NotADirError(f"inode {nid} is not a directory")
        return inode

    def iterdir(self, nid: int, pos: int = 0) -> Iterator[DirEntry]:
        """Entries from directory byte position ``pos`` on, "." and ".." included as on disk.

        A dot-omitted directory has no "." on disk: it comes last, as the kernel lists it.
        """
        inode = self._dir_inode(nid)
        bs = self.block_size
        blk, off = divmod(max(pos, 0), bs)
        nblocks = -(-inode.size // bs)
        while blk < nblocks:
            data, recs = self._dir_block(inode, blk)
            yield from entries_from(data, nid, blk * bs, off, recs)
            blk += 1
            off = 0
        if inode.dot_omitted and pos <= inode.size:
            # like fs/erofs/dir.c erofs_readdir: a dot-omitted directory gets its "." last,
            # at position i_size, and the listing then ends at i_size + 1
            yield DirEntry(name=b".", nid=nid, file_type=L.EROFS_FT_DIR, next_pos=inode.size + 1)

    def _dir_raw_block(self, inode: Inode, blk: int) -> bytes:
        """Directory block ``blk`` as the page cache holds it: zero-padded to the block size."""
        key = ("raw", inode.nid, blk)
        with self._lock:
            hit = self._dirblocks.get(key)
        if hit is None:
            bs = self.block_size
            hit = self.read(inode.nid, blk * bs, min(bs, inode.size - blk * bs)).ljust(bs, b"\0")
            with self._lock:
                self._dirblocks.put(key, hit)
        return hit

    def lookup(self, nid: int, name: bytes) -> int:
        """nid of ``name`` in directory ``nid``: the kernel's binary search over blocks, then within one."""
        inode = self._dir_inode(nid)
        if not name or len(name) > L.EROFS_NAME_LEN or b"\0" in name or not inode.size:
            raise NotFoundError(f"{name!r}: no such entry")
        hit = lookup_blocks(-(-inode.size // self.block_size), lambda b: self._dir_raw_block(inode, b), name,
                            self.block_size, nid)
        if hit is None:
            raise NotFoundError(f"{name.decode('utf-8', 'surrogateescape')}: no such file or directory")
        return hit[0]

    def resolve(self, path: str | bytes) -> int:
        """nid of an absolute path inside the image (symlinks are not followed)."""
        return resolve_path(self, path)

    # ------------------------------------------------------------------ xattrs
    @property
    def xattr_prefixes(self) -> list[bytes]:
        if self._prefixes is None:
            sb = self.sb
            if not sb.xattr_prefix_count:
                self._prefixes = []
            else:
                start = sb.xattr_prefix_start << 2
                if sb.has_compat(L.EROFS_FEATURE_COMPAT_PLAIN_XATTR_PFX):
                    reader = self.read_raw
                else:
                    owner = sb.metabox_nid or sb.packed_nid
                    if not owner:
                        raise CorruptedError("long xattr prefixes but no packed inode or metabox holds them")
                    reader = lambda p, n: self.read(owner, p, n)  # noqa: E731
                self._prefixes = parse_prefix_table(reader, start, sb.xattr_prefix_count)
        return self._prefixes

    def xattr_items(self, nid: int) -> list[tuple[bytes, bytes]]:
        with self._lock:
            items = self._xattrs.get(nid)
        if items is None:
            items = read_xattrs(self.sb, self.inode(nid), self.read_meta, self.xattr_prefixes)
            with self._lock:
                self._xattrs.put(nid, items)
        return items

    def xattrs(self, nid: int) -> dict[bytes, bytes]:
        return dict(self.xattr_items(nid))

    def listxattr(self, nid: int) -> list[bytes]:
        return [name for name, _ in self.xattr_items(nid)]

    def getxattr(self, nid: int, name: bytes) -> bytes:
        """The value getxattr(2) returns: the first entry of that name (inline, then shared);
        POSIX ACLs decoded and re-encoded as the kernel does (xattr.posix_acl_value); a name the
        inode's name filter rules out is absent whatever the entries hold (xattr.filtered_out)."""
        items = self.xattr_items(nid)
        if name.startswith(b"user.") and items and not (self.inode(nid).is_reg or self.inode(nid).is_dir):
            # fs/xattr.c xattr_permission: user.* values exist only on regular files and directories;
            # elsewhere the VFS answers ENODATA (listxattr still shows the names)
            raise NoDataError(f"no xattr {name.decode('utf-8', 'replace')} (user.* on a special file)")
        if items and filtered_out(self.sb, name_filter(self.inode(nid), self.read_meta), name):
            raise NoDataError(f"no xattr {name.decode('utf-8', 'replace')}")
        for n, v in items:
            if n == name:
                if name in POSIX_ACL_NAMES:
                    v = posix_acl_value(v, f"inode {nid} {name.decode()}")
                    if v is None:
                        break
                elif name == XATTR_NAME_CAPS:
                    v = capability_value(v, f"inode {nid}")
                return v
        raise NoDataError(f"no xattr {name.decode('utf-8', 'replace')}")

    # ------------------------------------------------------------------ filesystem
    def zstats(self) -> dict:
        """Decompressed-pcluster cache statistics ({} until compressed data was read)."""
        return self._zreader.stats() if self._zreader is not None else {}

    def statfs(self) -> dict[str, int]:
        """As the kernel's ``erofs_statfs``: every block used, f_files = 2^64-1."""
        total = self.sb.blocks + sum(d.blocks for d in self.sb.devices)
        files = (1 << 64) - 1
        return {"f_bsize": self.block_size, "f_frsize": self.block_size, "f_blocks": total, "f_bfree": 0,
                "f_bavail": 0, "f_files": files, "f_ffree": files - self.sb.inos, "f_namemax": L.EROFS_NAME_LEN}

    @staticmethod
    def is_dir_mode(mode: int) -> bool:
        return stat.S_ISDIR(mode)


def _with_devices(sb: Superblock, devices) -> Superblock:
    from dataclasses import replace
    return replace(sb, devices=devices)


def resolve_path(image, path: str | bytes) -> int:
    """nid of an absolute path through ``image.lookup`` from ``image.root_nid`` (symlinks are not
    followed); shared by Image and merge.MergedImage."""
    if isinstance(path, str):
        path = path.encode("utf-8", "surrogateescape")
    nid = image.root_nid
    try:
        for part in path.split(b"/"):
            if part in (b"", b"."):
                continue
            nid = image.lookup(nid, part)
    except (NotFoundError, NotADirError) as exc:
        raise type(exc)(f"{path.decode('utf-8', 'surrogateescape')}: {exc.strerror.split(': ')[-1]}") from None
    return nid
