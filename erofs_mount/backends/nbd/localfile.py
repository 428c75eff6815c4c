"""Opening a block source for the NBD backend.

``open_source(record)`` prefers the shared block-source layer
(``erofs_mount.sources``) and falls back to ``LocalFile``, a minimal local
reader with the same interface (``size``, ``async read_at``, ``async aclose``,
``stats()``, plus ``fileno()`` and sync ``pread`` for the zero-copy path), used
until ``erofs_mount.sources.local.LocalSource`` exists.
"""

from __future__ import annotations

import errno as _errno
import os
import stat
from typing import Any

from ...errors import ErofsMountError, NotFoundError, ShortReadError, SourceError
from .recovery import LocalRecord, OciLayerRecord, OciNativeBlobRecord, Record


class LocalFile:
    """A local image file or block device, read with pread(2)."""

    def __init__(self, path: str, fd: int, size: int) -> None:
        self.path = path
        self._fd = fd
        self.size = size
        self._reads = 0
        self._bytes = 0

    @classmethod
    def open(cls, path: str) -> LocalFile:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFoundError(f"{path}: no such file") from None
        except OSError as exc:
            raise SourceError(f"{path}: {exc.strerror}", errno=exc.errno) from None
        try:
            st = os.fstat(fd)
            if stat.S_ISBLK(st.st_mode):
                size = os.lseek(fd, 0, os.SEEK_END)
            elif stat.S_ISREG(st.st_mode):
                size = st.st_size
            else:
                raise SourceError(f"{path}: not a regular file or block device", errno=_errno.EINVAL)
        except BaseException:
            os.close(fd)
            raise
        return cls(os.path.realpath(path), fd, size)

    def fileno(self) -> int:
        return self._fd

    def pread(self, offset: int, length: int) -> bytes:
        data = os.pread(self._fd, length, offset)
        self._reads += 1
        self._bytes += len(data)
        return data

    async def read_at(self, offset: int, length: int) -> bytes:
        length = max(0, min(length, self.size - offset))
        data = self.pread(offset, length)
        if len(data) != length:
            raise ShortReadError(f"{self.path}: short read at {offset} ({len(data)} of {length} bytes)")
        return data

    async def aclose(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def stats(self) -> dict[str, Any]:
        return {"kind": "local", "path": self.path, "size": self.size, "reads": self._reads, "bytes": self._bytes}


async def open_source(record: Record) -> Any:
    """Open the block source a recovery record describes."""
    if isinstance(record, LocalRecord):
        try:  # the shared source layer, once it exists
            from ...sources.local import LocalSource  # type: ignore[import-not-found]
        except ImportError:
            return LocalFile.open(record.path)
        src = LocalSource.open(record.path)
        return await src if hasattr(src, "__await__") else src
    if isinstance(record, (OciLayerRecord, OciNativeBlobRecord)):
        raise ErofsMountError(
            "OCI sources are not available to the NBD backend yet", errno=_errno.EOPNOTSUPP
        )
    raise TypeError(record)
