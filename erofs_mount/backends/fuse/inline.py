"""Running reader calls inline on the trio thread when they cannot block.

A worker-thread hop costs more than most FUSE requests (a cached inode, a
directory block in the page cache).  So the operations first run a reader call
inline inside ``nowait()``: a source read that would have to wait for the disk
(or the network) raises ``WouldBlock`` instead, and the call is redone in a
worker thread.  The reader's caches only ever store complete values, so an
interrupted inline attempt leaves nothing half-done.

``LocalReader`` is such a source over a file descriptor: inline reads use
``preadv2(RWF_NOWAIT)`` (the page cache or nothing); blocking reads of less
than ``READ_AROUND`` bytes fetch the aligned chunk around them, as the kernel's
read-around does for a loop-mounted image, so the metadata near an inode or a
directory block is in the page cache for the next inline attempt.
"""

from __future__ import annotations

import errno
import os
import threading
from contextlib import contextmanager

from ...errors import SourceError

READ_AROUND = 128 * 1024
_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", None)
_state = threading.local()


class WouldBlock(Exception):
    """An inline read would have waited: redo the call in a worker thread."""


@contextmanager
def nowait():
    _state.on = True
    try:
        yield
    finally:
        _state.on = False


def nowait_active() -> bool:
    return getattr(_state, "on", False)


class LocalReader:
    """Positional reads of a local source (``fileno()``, ``size``, ``pread``) for the reader."""

    def __init__(self, source) -> None:
        self.source = source
        self.size: int = source.size
        self._fd = source.fileno()
        self._nowait_ok = _RWF_NOWAIT is not None

    def read_at(self, offset: int, length: int) -> bytes:
        length = max(0, min(length, self.size - offset))
        if length == 0:
            return b""
        if nowait_active():
            return self._read_nowait(offset, length)
        if length < READ_AROUND:
            start = offset - offset % READ_AROUND
            end = min(self.size, max(offset + length, start + READ_AROUND))
            chunk = self.source.pread(start, end - start)
            return chunk[offset - start:offset - start + length]
        return self.source.pread(offset, length)

    def _read_nowait(self, offset: int, length: int) -> bytes:
        if not self._nowait_ok:
            raise WouldBlock
        buf = bytearray(length)
        try:
            n = os.preadv(self._fd, [buf], offset, _RWF_NOWAIT)
        except BlockingIOError:
            raise WouldBlock from None
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                self._nowait_ok = False  # a filesystem without RWF_NOWAIT: always use threads
                raise WouldBlock from None
            raise SourceError(f"read at {offset}: {exc.strerror}", errno=exc.errno) from None
        if n != length:
            raise WouldBlock
        return bytes(buf)
