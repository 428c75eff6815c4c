"""Persistent blob cache (sync file I/O; the async callers run it in worker threads).

One directory per blob digest under the cache root
(``/var/cache/erofs-mount/blobs`` for root, ``$XDG_CACHE_HOME/erofs-mount/blobs``
otherwise), shared by every mount of that digest::

    <root>/sha256/<hex>/data   sparse file of the blob's size
    <root>/sha256/<hex>/map    header + bitmap of 4 KiB blocks present in data
    <root>/sha256/<hex>/verified  (verity) the root hash + a bitmap of the blocks that passed the
                               dm-verity check before they were written (``use_marks``/``mark``):
                               read back without hashing them again; ``forget`` clears both bits

Ordering: block data is written and ``fdatasync``ed before its bits are set, so
a crash can lose cached blocks but never mark missing ones present.  When
every bit is set the data is hashed once against the digest; a mismatch throws
the cache entry away (the registry does not verify content for us either), except
the blocks marked verified by the dm-verity tree in use.
Concurrency: every open entry holds a shared ``flock`` on its map (eviction
only removes entries it can lock exclusively); bitmap updates re-read and OR
the affected bytes under a POSIX record lock, so concurrent mounts never
clear each other's bits.  ``enforce_limit`` keeps the whole root under
``cache_limit`` bytes by removing the least recently opened unused entries.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import struct
import threading

from .local import pread_nowait

log = logging.getLogger("erofs_mount.sources.cache")

BLOCK = 4096
_HEADER = struct.Struct("<16sQII32x")  # magic, blob size, block size, flags
_MAGIC = b"erofs-mount-bc\x00\x01"
_VERIFIED = 1
_MARKS = struct.Struct("<16s64s")  # the ``verified`` file: magic, the root hash the marks are for
_MARKS_MAGIC = b"erofs-mount-vm\x00\x01"


def all_set(bitmap, first: int, stop: int) -> bool:
    """Whether bits first..stop-1 of *bitmap* (least significant bit first) are all set: whole bytes
    compared at once (a 1 MiB read asks for 256 blocks, twice per read of a verified blob's cache;
    bit by bit that took a quarter of a warm read's time)."""
    if first >= stop:
        return True
    lo, hi = first >> 3, (stop - 1) >> 3
    if lo == hi:
        mask = ((1 << (stop - first)) - 1) << (first & 7)
        return bitmap[lo] & mask == mask
    head = (0xFF << (first & 7)) & 0xFF
    tail = (1 << (((stop - 1) & 7) + 1)) - 1
    if bitmap[lo] & head != head or bitmap[hi] & tail != tail:
        return False
    return bitmap[lo + 1:hi].count(0xFF) == hi - lo - 1


def default_root() -> str:
    """``$EROFS_MOUNT_CACHE_DIR``, else ``/var/cache/erofs-mount/blobs`` for root, else the XDG cache."""
    if os.environ.get("EROFS_MOUNT_CACHE_DIR"):
        return os.environ["EROFS_MOUNT_CACHE_DIR"]
    if os.geteuid() == 0:
        return "/var/cache/erofs-mount/blobs"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "erofs-mount", "blobs")


def _entry_dir(root: str, digest: str) -> str:
    algo, _, hexpart = digest.partition(":")
    if not hexpart or "/" in digest or not hexpart.isalnum():
        raise ValueError(f"bad digest {digest!r}")
    return os.path.join(root, algo, hexpart)


class DiskCache:
    """The cache entry of one blob, opened for reading and filling."""

    def __init__(self, path: str, digest: str, size: int, data_fd: int, map_fd: int, bitmap: bytearray,
                 verified: bool) -> None:
        self.path = path
        self.digest = digest
        self.size = size
        self._data = data_fd
        self._map = map_fd
        self._bits = bitmap
        self._nblocks = (size + BLOCK - 1) // BLOCK
        self._present = int.from_bytes(bitmap, "little").bit_count()
        self.verified = verified
        self._lock = threading.Lock()
        self.written = 0
        self._marks: bytearray | None = None   # verified marks (use_marks)
        self._marks_fd = -1

    @classmethod
    def open(cls, root: str, digest: str, size: int, *, data_fd: int | None = None) -> "DiskCache":
        """``data_fd``: an fd of the entry's data file to use (a dup is taken) instead of opening it
        (fanotify mode: an fd opened before the file was marked, whose I/O raises no events)."""
        path = _entry_dir(root, digest)
        os.makedirs(path, mode=0o700, exist_ok=True)
        nblocks = (size + BLOCK - 1) // BLOCK
        map_fd = os.open(os.path.join(path, "map"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(map_fd, fcntl.LOCK_SH)
            head = os.pread(map_fd, _HEADER.size, 0)
            nbytes = (nblocks + 7) // 8
            ok = len(head) == _HEADER.size
            if ok:
                magic, bsize, block, flags = _HEADER.unpack(head)
                ok = magic == _MAGIC and bsize == size and block == BLOCK
            if not ok:  # new or foreign: (re)initialise under an exclusive record lock
                fcntl.lockf(map_fd, fcntl.LOCK_EX)
                try:
                    os.ftruncate(map_fd, 0)
                    os.pwrite(map_fd, _HEADER.pack(_MAGIC, size, BLOCK, 0) + bytes(nbytes), 0)
                finally:
                    fcntl.lockf(map_fd, fcntl.LOCK_UN)
                flags = 0
            bitmap = bytearray(os.pread(map_fd, nbytes, _HEADER.size).ljust(nbytes, b"\0"))
            if data_fd is not None:
                data_fd = os.dup(data_fd)
            else:
                data_fd = os.open(os.path.join(path, "data"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            if os.fstat(data_fd).st_size != size:
                os.ftruncate(data_fd, size)
            os.utime(os.path.join(path, "map"))  # LRU order for eviction
        except BaseException:
            os.close(map_fd)
            raise
        return cls(path, digest, size, data_fd, map_fd, bitmap, bool(flags & _VERIFIED))

    # -- bitmap ---------------------------------------------------------------------------
    def _blocks(self, start: int, end: int) -> range:
        return range(start // BLOCK, (end + BLOCK - 1) // BLOCK)

    def _bit(self, i: int) -> bool:
        return bool(self._bits[i >> 3] & (1 << (i & 7)))

    def has(self, start: int, end: int) -> bool:
        blocks = self._blocks(start, end)
        if all_set(self._bits, blocks.start, blocks.stop):
            return True
        # another mount may have filled them: refresh the bytes concerned
        lo, hi = blocks.start >> 3, ((blocks.stop - 1) >> 3) + 1
        fresh = os.pread(self._map, hi - lo, _HEADER.size + lo)
        with self._lock:
            self._merge(lo, fresh)
        return all_set(self._bits, blocks.start, blocks.stop)

    def _merge(self, lo: int, fresh: bytes) -> None:
        """OR *fresh* bitmap bytes into ours at byte *lo*, keeping the present count (lock held)."""
        old = self._bits[lo:lo + len(fresh)]
        new = bytes(a | b for a, b in zip(old, fresh))
        self._present += sum(bin(b).count("1") for b in new) - sum(bin(b).count("1") for b in old)
        self._bits[lo:lo + len(new)] = new

    @property
    def present_bytes(self) -> int:
        return min(self.size, self._present * BLOCK)

    @property
    def complete(self) -> bool:
        return self._present >= self._nblocks

    # -- data ------------------------------------------------------------------------------
    def read(self, start: int, end: int) -> bytes:
        out = os.pread(self._data, end - start, start)
        if len(out) != end - start:
            raise OSError(f"short read from cache file {self.path}/data")
        return out

    def read_nowait(self, start: int, end: int) -> bytes | None:
        """The bytes if the page cache holds all of them, else None: a read that never waits for the
        disk (the FUSE daemon's inline path)."""
        try:
            return pread_nowait(self._data, start, end - start)
        except OSError:      # no RWF_NOWAIT here, or a read error: the caller reads the usual way
            return None

    def write(self, start: int, data, *, replace: bool = False) -> int:
        """Store block-aligned *data* at *start* (the last block may be short at the blob's end).

        Returns the bytes written (0 when every block was already present).  *replace*: write
        even over present blocks (what is there may differ: bytes about to be marked verified must
        be the ones that were checked, not an older unverified copy)."""
        end = start + len(data)
        if start % BLOCK or (end % BLOCK and end != self.size):
            raise ValueError(f"unaligned cache write {start}-{end}")
        if not replace and self.has(start, end):
            return 0
        n = os.pwrite(self._data, data, start)
        if n != len(data):
            raise OSError(f"short write to cache file {self.path}/data")
        os.fdatasync(self._data)  # the data is durable before any bit says so
        blocks = self._blocks(start, end)
        lo, hi = blocks.start >> 3, ((blocks.stop - 1) >> 3) + 1
        with self._lock:
            for i in blocks:
                if not self._bit(i):
                    self._bits[i >> 3] |= 1 << (i & 7)
                    self._present += 1
            fcntl.lockf(self._map, fcntl.LOCK_EX, hi - lo, _HEADER.size + lo)
            try:
                self._merge(lo, os.pread(self._map, hi - lo, _HEADER.size + lo))
                os.pwrite(self._map, bytes(self._bits[lo:hi]), _HEADER.size + lo)
            finally:
                fcntl.lockf(self._map, fcntl.LOCK_UN, hi - lo, _HEADER.size + lo)
        with self._lock:
            self.written += len(data)
        return len(data)

    # -- verified marks (verity/source.py): which blocks passed a dm-verity check, per root hash ------
    def use_marks(self, root_hex: str) -> None:
        """Keep marks of verified blocks in ``verified`` (for *root_hex*; marks of another root hash
        are dropped): a block written after its check is read back without hashing it again."""
        nbytes = (self._nblocks + 7) // 8
        head = _MARKS.pack(_MARKS_MAGIC, bytes.fromhex(root_hex).ljust(64, b"\0"))
        fd = os.open(os.path.join(self.path, "verified"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX)
            try:
                if os.pread(fd, _MARKS.size, 0) != head:
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, head + bytes(nbytes), 0)
                bits = bytearray(os.pread(fd, nbytes, _MARKS.size).ljust(nbytes, b"\0"))
            finally:
                fcntl.lockf(fd, fcntl.LOCK_UN)
        except BaseException:
            os.close(fd)
            raise
        with self._lock:
            if self._marks_fd >= 0:
                os.close(self._marks_fd)
            self._marks_fd, self._marks = fd, bits
        # a mark without the block itself means nothing: the marks ANDed with the present bits, as
        # integers (bit by bit this took ~0.5 s at mount for a 4 GB blob)
        with self._lock:
            both = int.from_bytes(self._marks, "little") & int.from_bytes(self._bits, "little")
            self._marks[:] = both.to_bytes(nbytes, "little")

    def marked(self, start: int, end: int) -> bool:
        marks = self._marks
        if marks is None:
            return False
        blocks = self._blocks(start, end)
        return all_set(marks, blocks.start, blocks.stop) and all_set(self._bits, blocks.start, blocks.stop)

    def mark(self, start: int, end: int) -> None:
        """Mark the whole blocks of [start, end) verified (they must be present)."""
        if self._marks is None:
            return
        blocks = self._blocks(start, end)
        if not blocks:
            return
        lo, hi = blocks.start >> 3, ((blocks.stop - 1) >> 3) + 1
        with self._lock:
            for i in blocks:
                if self._bit(i):
                    self._marks[i >> 3] |= 1 << (i & 7)
            fcntl.lockf(self._marks_fd, fcntl.LOCK_EX, hi - lo, _MARKS.size + lo)
            try:
                fresh = os.pread(self._marks_fd, hi - lo, _MARKS.size + lo)
                merged = bytes(a | b for a, b in zip(self._marks[lo:hi], fresh.ljust(hi - lo, b"\0")))
                self._marks[lo:hi] = merged
                os.pwrite(self._marks_fd, merged, _MARKS.size + lo)
            finally:
                fcntl.lockf(self._marks_fd, fcntl.LOCK_UN, hi - lo, _MARKS.size + lo)

    def forget(self, start: int, end: int) -> None:
        """Clear the bits of the blocks inside [start, end) (wholly or partly): read again next time."""
        blocks = self._blocks(start, end)
        if not blocks:
            return
        lo, hi = blocks.start >> 3, ((blocks.stop - 1) >> 3) + 1
        with self._lock:
            fcntl.lockf(self._map, fcntl.LOCK_EX, hi - lo, _HEADER.size + lo)
            try:
                self._merge(lo, os.pread(self._map, hi - lo, _HEADER.size + lo))
                for i in blocks:
                    if self._bit(i):
                        self._bits[i >> 3] &= ~(1 << (i & 7)) & 0xFF
                        self._present -= 1
                os.pwrite(self._map, bytes(self._bits[lo:hi]), _HEADER.size + lo)
                if self.verified:
                    os.pwrite(self._map, _HEADER.pack(_MAGIC, self.size, BLOCK, 0), 0)
                    self.verified = False
                if self._marks is not None:
                    for i in blocks:
                        self._marks[i >> 3] &= ~(1 << (i & 7)) & 0xFF
                    os.pwrite(self._marks_fd, bytes(self._marks[lo:hi]), _MARKS.size + lo)
            finally:
                fcntl.lockf(self._map, fcntl.LOCK_UN, hi - lo, _HEADER.size + lo)

    def verify(self) -> bool:
        """Hash the complete data against the digest; on mismatch empty the entry. True if good.
        An entry named by no content hash (``s3obj:``, an S3 object pinned by its ETag/version:
        every GET of it was conditional on that) has nothing to be hashed against: True."""
        algo, _, want = self.digest.partition(":")
        if algo not in hashlib.algorithms_available:
            return True
        h = hashlib.new(algo)
        pos = 0
        while pos < self.size:
            piece = os.pread(self._data, min(4 << 20, self.size - pos), pos)
            if not piece:
                break
            h.update(piece)
            pos += len(piece)
        if h.hexdigest() == want and pos == self.size:
            with self._lock:
                os.pwrite(self._map, _HEADER.pack(_MAGIC, self.size, BLOCK, _VERIFIED), 0)
                self.verified = True
            return True
        with self._lock:
            # the blocks marked verified (each checked against the dm-verity tree in use before it was
            # written) stay; the rest of the entry goes: the block that differs is among them
            nbytes = len(self._bits)
            keep = bytes(self._marks) if self._marks is not None else bytes(nbytes)
            self._bits[:] = keep
            self._present = int.from_bytes(keep, "little").bit_count()
            os.pwrite(self._map, _HEADER.pack(_MAGIC, self.size, BLOCK, 0) + keep, 0)
            if not self._present:
                os.ftruncate(self._data, 0)
                os.ftruncate(self._data, self.size)
        kept = f" ({self._present} blocks verified by dm-verity kept)" if self._present else ""
        log.error("cache entry %s does not match its digest: discarded%s", self.path, kept)
        return False

    def close(self) -> None:
        for attr in ("_data", "_map", "_marks_fd"):
            fd = getattr(self, attr)
            if fd >= 0:
                setattr(self, attr, -1)
                os.close(fd)


def usage(root: str) -> list[tuple[float, int, str]]:
    """(last open time, bytes on disk, entry dir) of every entry under *root*."""
    out = []
    if not os.path.isdir(root):
        return out
    for algo in os.listdir(root):
        adir = os.path.join(root, algo)
        if not os.path.isdir(adir):
            continue
        for name in os.listdir(adir):
            path = os.path.join(adir, name)
            try:
                # data + map, and a tar layer's index files (sources/tarlayer/store.py)
                used = sum(os.stat(os.path.join(path, f)).st_blocks * 512 for f in os.listdir(path))
                out.append((os.stat(os.path.join(path, "map")).st_mtime, used, path))
            except OSError:
                continue
    return out


def enforce_limit(root: str, limit: int, *, keep: str | None = None) -> int:
    """Remove least recently opened unused entries until *root* holds <= *limit* bytes; returns bytes freed."""
    entries = sorted(usage(root))
    total = sum(u for _, u, _ in entries)
    freed = 0
    for _, used, path in entries:
        if total <= limit:
            break
        if path == keep:
            continue
        try:
            fd = os.open(os.path.join(path, "map"), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # in use by a mount: skip it
        except BlockingIOError:
            os.close(fd)
            continue
        try:
            shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(fd)
        total -= used
        freed += used
        log.info("cache: evicted %s (%d bytes)", path, used)
    return freed
