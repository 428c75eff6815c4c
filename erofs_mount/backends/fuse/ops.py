"""pyfuse3 operations over the pure EROFS reader: a thin, read-only translation layer.

Every reader call that may block runs in a worker thread (``trio.to_thread.run_sync``
with one ``CapacityLimiter``) so a slow read never blocks other FUSE requests; with
a source that supports it, a call is first tried inline and only moved to a thread
when a read would wait (accel/inline.py).  Results are plain values, and all bookkeeping (lookup counts, the directory
parent registry) is mutated in the trio thread only, between awaits.

Files: ``open`` answers with ``keep_cache`` (the image never changes), and first hands a small
file's bytes to the kernel's page cache when it can (accel/pagestore.py), so reading it sends no READ.

Errors: only ``pyfuse3.FUSEError`` leaves a handler.  ``erofs_mount.errors``
exceptions are converted once via their ``errno``; anything unexpected is
logged and becomes ``EIO``.  ``init`` and ``forget`` never raise.

Inode numbers: nids as the kernel reports them (inodes.py).

Directories: dirops.py (OPENDIR, READDIR, RELEASEDIR).  A directory nid met under a second
(parent, name) is a cycle: ``ELOOP``, which is what the kernel's VFS reports when
``d_splice_alias`` finds the directory already aliased above.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from dataclasses import dataclass

import pyfuse3
import trio

from ...erofs.image import Image
from ...errors import LoopError, NotFoundError
from .attrs import TIMEOUT, access_error, entry_attributes
from .accel.decoder import MIN_READ
from .accel.inline import WouldBlock, call_nowait, nowait_active
from .accel.pagestore import STORE_MAX, PageStore
from .accel.readnext import ReadNext
from .accel.storeahead import StoreAhead
from .dirops import DirectoryOps
from .errmap import fuse_errors
from .inodes import InodeNumbers

log = logging.getLogger(__name__)

ROOT_INODE = pyfuse3.ROOT_INODE
# lzma, deflate and zstd reads up to this size are decoded inline too (~0.1-1.5 ms): a thread hop and
# the GIL handed back and forth cost more.  bench_fuse "readall" (3 runs, ratio to the kernel) with
# every such read in a worker thread -> inline up to 32 KiB -> up to 128 KiB: lzma 0.60 -> 0.72 -> 0.85,
# deflate 0.43 -> 0.62 -> 0.81, zstd 0.41 -> 0.71 (128 KiB); bigger reads still go to threads
SLOW_INLINE_MAX = 128 * 1024
_DOTS = (b".", b"..")


@dataclass(frozen=True, slots=True)
class OpsConfig:
    uid: int | None = None          # report every inode as owned by this uid
    gid: int | None = None
    threads: int = 8                # worker threads for reader calls
    store_max: int = STORE_MAX      # files up to this size go into the page cache at open (accel/pagestore.py); 0: off
    store_ahead: bool = True        # the next file of a listing is stored before its OPEN (accel/storeahead.py)
    read_next: bool = True          # ... or read in a worker thread when it cannot be inline (accel/readnext.py)


class ErofsOperations(DirectoryOps, pyfuse3.Operations):
    """Read-only FUSE operations over one ``Image``."""

    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(self, image: Image, config: OpsConfig = OpsConfig(), *, enable_acl: bool = False,
                 inline: bool = False) -> None:
        """``inline``: the image's sources honour ``inline.nowait()`` (raise ``WouldBlock`` rather than
        wait), so reader calls are tried on the trio thread first (see accel/inline.py)."""
        super().__init__()
        self._inline = inline
        self.image = image
        self.config = config
        self.enable_acl = enable_acl
        self.root_nid = image.root_nid
        numbers = InodeNumbers(self.root_nid, bool(image.sb.has_metabox))
        self.ino_of, self.nid_of = numbers.ino_of, numbers.nid_of
        # lz4 decodes a pcluster in microseconds: cheaper inline than a thread hop; other codecs are not
        self._inline_compressed = image.sb.lz4_only
        self._limiter = trio.CapacityLimiter(max(1, config.threads))
        self._lookups: dict[int, int] = {}                  # ino -> kernel lookup count
        self._attrs: dict[int, pyfuse3.EntryAttributes] = {}  # attributes of inodes the kernel knows
        self._init_dirs()
        self.pages = PageStore(config.store_max)
        self.ahead = StoreAhead(self._store_ahead)
        self.readnext = ReadNext(self._read_whole) if config.read_next and config.store_max else None
        self.ahead_stores = 0
        self.read_requests = 0
        self.decoder = None     # decoder.Decoder: a second process for big READs of compressed files
        self.decode_all = False  # … and of uncompressed ones (a verified image: the process hashes them)

    # ------------------------------------------------------------------ helpers
    async def _run(self, fn, *args):
        if self._inline:
            try:
                return call_nowait(fn, *args)
            except WouldBlock:
                pass
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    def _make_attr(self, nid: int) -> pyfuse3.EntryAttributes:
        """Attributes of inode ``nid`` (worker thread: may read the image)."""
        c = self.config
        return entry_attributes(self.image.inode(nid), self.ino_of(nid), self.image.block_size, c.uid, c.gid)

    def _remember(self, attr: pyfuse3.EntryAttributes) -> None:
        ino = attr.st_ino
        self._lookups[ino] = self._lookups.get(ino, 0) + 1
        self._attrs[ino] = attr

    # ------------------------------------------------------------------ lifecycle
    def init(self) -> None:
        try:
            log.info("FUSE session initialised (root nid %d, block size %d)", self.root_nid,
                     self.image.block_size)
        except Exception:  # pragma: no cover - init must never raise
            pass

    async def forget(self, inode_list) -> None:
        try:
            for ino, n in inode_list:
                left = self._lookups.get(ino, 0) - n
                if left > 0:
                    self._lookups[ino] = left
                else:
                    self._lookups.pop(ino, None)
                    if ino != ROOT_INODE:
                        self._attrs.pop(ino, None)
        except Exception:  # pragma: no cover - forget must never raise
            log.exception("forget failed")

    # ------------------------------------------------------------------ names and attributes
    def _lookup_sync(self, parent_nid: int, name: bytes) -> tuple[int, pyfuse3.EntryAttributes]:
        nid = self.image.lookup(parent_nid, name)
        return nid, self._make_attr(nid)

    @fuse_errors
    async def lookup(self, parent_inode, name, ctx=None):
        parent_nid = self.nid_of(parent_inode)
        if name in _DOTS:  # the kernel resolves these itself; only NFS export would ask
            raise pyfuse3.FUSEError(errno.ENOENT)
        try:
            nid, attr = await self._run(self._lookup_sync, parent_nid, name)
        except NotFoundError:
            # the image never changes: let the kernel cache the miss (a negative dentry, nodeid 0)
            neg = pyfuse3.EntryAttributes()
            neg.st_ino = 0
            neg.entry_timeout = TIMEOUT
            return neg
        known = self._dir_clash(nid, parent_nid, name) if stat.S_ISDIR(attr.st_mode) else None
        if known is not None:
            raise LoopError(f"directory nid {nid} reached as {name!r} in nid {parent_nid} "
                            f"but already linked as {known[1]!r} in nid {known[0]}")
        self._remember(attr)
        return attr

    @fuse_errors
    async def getattr(self, inode, ctx=None):
        attr = self._attrs.get(inode)
        if attr is None:
            attr = await self._run(self._make_attr, self.nid_of(inode))
            if inode == ROOT_INODE:
                self._attrs[inode] = attr
        return attr

    @fuse_errors
    async def setattr(self, inode, attr, fields, fh, ctx):
        raise pyfuse3.FUSEError(errno.EROFS)

    @fuse_errors
    async def readlink(self, inode, ctx):
        return await self._run(self.image.readlink, self.nid_of(inode))

    @fuse_errors
    async def access(self, inode, mode, ctx):
        # only called without default_permissions
        attr = await self.getattr(inode, ctx)
        err = access_error(attr.st_mode, attr.st_uid, attr.st_gid, mode, ctx.uid, ctx.gid,
                           lambda: pyfuse3.get_sup_groups(ctx.pid))
        if err:
            raise pyfuse3.FUSEError(err)
        return True

    # ------------------------------------------------------------------ files
    @fuse_errors
    async def open(self, inode, flags, ctx):
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & (os.O_TRUNC | os.O_CREAT):
            raise pyfuse3.FUSEError(errno.EROFS)
        attr = self._attrs.get(inode)       # known from lookup/readdir, as a rule
        if attr is None:
            attr = await self.getattr(inode, ctx)
        if stat.S_ISDIR(attr.st_mode):
            raise pyfuse3.FUSEError(errno.EISDIR)
        pages = self.pages
        if pages.wants(inode, attr.st_size):
            data = await self.readnext.take(inode) if self.readnext is not None else None
            if data is None:
                try:
                    data = await self._run(self._read_sync, self.nid_of(inode), 0, attr.st_size)
                except Exception:  # noqa: BLE001 - a store only saves a READ: open must answer as without it
                    data = None     # read() reports the failure, with its errno
            if data is not None and len(data) == attr.st_size:
                pages.store(inode, data)
        pages.opened(inode)
        if self._inline and self.config.store_ahead:
            self.ahead.opened(inode)
        if self.readnext is not None:
            self._read_next(inode)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    def _read_next(self, ino: int) -> None:
        """Start reading the file listed after ``ino`` in a worker thread (readnext.py) when nothing is
        tried inline; with the inline path, storeahead tries first and hands over what would block."""
        if self._inline:
            return
        nxt = self.ahead.next_of(ino)
        if nxt is not None and self.pages.wants(*nxt):
            self.readnext.start(*nxt)

    async def _read_whole(self, ino: int, size: int) -> bytes:
        return await trio.to_thread.run_sync(self.image.read, self.nid_of(ino), 0, size, limiter=self._limiter)

    def _store_ahead(self, ino: int, size: int) -> None:
        """Store a file before its OPEN (accel/storeahead.py): only inline, never raises."""
        pages = self.pages
        if not pages.wants(ino, size):
            return
        try:
            data = call_nowait(self._read_sync, self.nid_of(ino), 0, size)
        except WouldBlock:
            if self.readnext is not None:
                self.readnext.start(ino, size)      # its OPEN takes it from a worker thread (readnext.py)
            return
        except Exception:  # noqa: BLE001 - an error: a guess only, open() does it again
            return
        if len(data) == size and pages.store(ino, data):
            self.ahead_stores += 1

    def _read_sync(self, nid: int, off: int, size: int) -> bytes:
        if nowait_active() and size > SLOW_INLINE_MAX and not self._inline_compressed \
                and self.image.inode(nid).is_compressed:
            raise WouldBlock  # much slow decompression (lzma, deflate, zstd): keep it off the trio thread
        return self.image.read(nid, off, size)

    @fuse_errors
    async def read(self, fh, off, size):
        self.read_requests += 1
        dec = self.decoder
        if dec is not None and size >= MIN_READ:
            attr = self._attrs.get(fh)
            if attr is not None and (self.decode_all or self._compressed(fh)):
                data = dec.answer(self.nid_of(fh), off, size, attr.st_size)
                if data is not None:
                    return data
        return await self._run(self._read_sync, self.nid_of(fh), off, size)

    def _compressed(self, ino: int) -> bool:
        """Whether an open file's data is compressed (its inode is cached by now; if not, no)."""
        try:
            return call_nowait(self.image.inode, self.nid_of(ino)).is_compressed
        except Exception:  # noqa: BLE001 - WouldBlock, or an error read() itself will report
            return False

    @fuse_errors
    async def release(self, fh):
        self.pages.released(fh)

    # flush is left to the base class: its ENOSYS makes the kernel stop sending FLUSH on every close

    # refuse every modifying operation with EROFS (the mount is "ro" too, so the VFS
    # normally answers these before they reach us)
    async def _erofs(self, *args):
        raise pyfuse3.FUSEError(errno.EROFS)

    write = mknod = mkdir = unlink = rmdir = symlink = rename = link = create = _erofs
    setxattr = removexattr = fsync = fsyncdir = _erofs

    # ------------------------------------------------------------------ xattrs and statfs
    @fuse_errors
    async def getxattr(self, inode, name, ctx):
        return await self._run(self.image.getxattr, self.nid_of(inode), name)

    @fuse_errors
    async def listxattr(self, inode, ctx):
        names = await self._run(self.image.listxattr, self.nid_of(inode))
        if ctx is not None and ctx.uid != 0:
            # erofs lists trusted.* only to CAP_SYS_ADMIN (fs/erofs/xattr.c, erofs_xattr_trusted_list);
            # uid 0 stands in for the capability here
            names = [n for n in names if not n.startswith(b"trusted.")]
        return names

    @fuse_errors
    async def statfs(self, ctx):
        info = self.image.statfs()
        s = pyfuse3.StatvfsData()
        s.f_bsize = info["f_bsize"]
        s.f_frsize = info.get("f_frsize", info["f_bsize"])
        s.f_blocks = info["f_blocks"]
        s.f_bfree = info.get("f_bfree", 0)
        s.f_bavail = info.get("f_bavail", 0)
        s.f_files = info["f_files"]
        s.f_ffree = info["f_ffree"]
        s.f_favail = info["f_ffree"]
        s.f_namemax = info["f_namemax"]
        return s
