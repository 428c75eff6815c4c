"""LocalSource: a regular file or a block device, read with positional reads.

``await src.read_at()`` runs the pread in a worker thread only when it may
block: a read that the page cache can answer (checked with ``preadv2`` and
``RWF_NOWAIT`` where the kernel supports it) is done inline, which is several
times cheaper than a thread hop; everything else goes to
``trio.to_thread.run_sync`` so a slow disk never stalls the event loop.
The sync ``pread`` and ``fileno`` are for the FUSE worker thread and for the
NBD server's ``os.sendfile``.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct


from ..errors import NotFoundError, SourceError, UsageError

BLKGETSIZE64 = 0x80081272  # _IOR(0x12, 114, size_t), include/uapi/linux/fs.h
_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", None)
_INLINE_MAX = 128 * 1024  # try the non-blocking inline path up to this size
NOWAIT_UNSUPPORTED = (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS)


def pread_nowait(fd: int, offset: int, length: int) -> bytes | None:
    """``length`` bytes at ``offset`` if the page cache holds all of them (``preadv2(RWF_NOWAIT)``),
    else None.  Raises OSError for a real error; one whose errno is in ``NOWAIT_UNSUPPORTED`` says
    this file (its filesystem, the kernel, this Python) never reads without waiting."""
    if _RWF_NOWAIT is None:
        raise OSError(errno.ENOSYS, "preadv2(RWF_NOWAIT) is not available")
    buf = bytearray(length)
    try:
        n = os.preadv(fd, [buf], offset, _RWF_NOWAIT)
    except BlockingIOError:
        return None
    return bytes(buf) if n == length else None


def _device_size(fd: int) -> int:
    buf = fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8)
    return struct.unpack("=Q", buf)[0]


class LocalSource:
    """A file or block device opened read-only."""

    def __init__(self, fd: int, size: int, path: str, *, is_block: bool) -> None:
        self._fd = fd
        self.size = size
        self.path = path
        self.is_block = is_block
        self._nowait = _RWF_NOWAIT is not None
        self._stats = {"bytes_read": 0, "requests": 0, "inline_reads": 0, "thread_reads": 0}

    @classmethod
    def open(cls, path: str | os.PathLike) -> "LocalSource":
        path = os.fspath(path)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFoundError(f"{path}: no such file") from None
        except OSError as exc:
            raise SourceError(f"{path}: {exc.strerror}", errno=exc.errno) from None
        try:
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode):
                size, is_block = st.st_size, False
            elif stat.S_ISBLK(st.st_mode):
                size, is_block = _device_size(fd), True
            else:
                raise UsageError(f"{path}: not a regular file or block device")
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, size, os.path.realpath(path), is_block=is_block)

    def fileno(self) -> int:
        if self._fd < 0:
            raise SourceError(f"{self.path}: source is closed", errno=errno.EBADF)
        return self._fd

    def pread(self, offset: int, length: int) -> bytes:
        """Exactly *length* bytes at *offset* (short only past the end of the source)."""
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        length = max(0, min(length, self.size - offset))
        if length == 0:
            return b""
        fd = self.fileno()
        self._stats["requests"] += 1
        try:
            data = os.pread(fd, length, offset)
            if len(data) < length:
                parts = [data]
                got = len(data)
                while got < length:
                    more = os.pread(fd, length - got, offset + got)
                    if not more:
                        break
                    parts.append(more)
                    got += len(more)
                data = b"".join(parts)
        except OSError as exc:
            raise SourceError(f"{self.path}: read at {offset}: {exc.strerror}", errno=exc.errno) from None
        self._stats["bytes_read"] += len(data)
        return data

    def _try_nowait(self, offset: int, length: int) -> bytes | None:
        """Inline read if the page cache holds all of it, else None."""
        try:
            data = pread_nowait(self._fd, offset, length)
        except OSError as exc:
            if exc.errno in NOWAIT_UNSUPPORTED:
                self._nowait = False  # e.g. a filesystem or kernel without RWF_NOWAIT
                return None
            raise SourceError(f"{self.path}: read at {offset}: {exc.strerror}", errno=exc.errno) from None
        if data is None:
            return None
        self._stats["requests"] += 1
        self._stats["bytes_read"] += length
        self._stats["inline_reads"] += 1
        return data

    async def read_at(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        length = max(0, min(length, self.size - offset))
        if length == 0:
            return b""
        self.fileno()
        if self._nowait and length <= _INLINE_MAX:
            data = self._try_nowait(offset, length)
            if data is not None:
                return data
        self._stats["thread_reads"] += 1
        import trio  # here, not at import: sync users (the CLI tools) never pay for it

        return await trio.to_thread.run_sync(self.pread, offset, length)

    def stats(self) -> dict:
        # bytes_fetched/requests as for every source; no cache, no retries here
        return {"size": self.size, "bytes_fetched": self._stats["bytes_read"], **self._stats}

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    async def aclose(self) -> None:
        self.close()

    def __enter__(self) -> "LocalSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> "LocalSource":
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LocalSource({self.path!r}, size={self.size})"
