"""The holder <-> daemon link of fanotify mode, sans-I/O: fixed 24-byte records on a unix stream
socket.

    FILL   holder -> daemon   (id, offset, count)   make [offset, offset+count) of the sparse file
                                                     local; ``id`` is the event's fd number in the
                                                     holder (what the kernel's answer is matched by)
    DONE   daemon -> holder   (id, errno)           0: the range is local, allow the access;
                                                     else deny it with that errno (EIO)

The holder sends its pre-mark write fd with SCM_RIGHTS once, right after accepting a daemon
(holder.py); a daemon that reconnects gets every FILL still unanswered again.
"""

from __future__ import annotations

import errno as _errno
import struct
from dataclasses import dataclass

from ...errors import ErofsMountError

RECORD = struct.Struct("<IiQQ")  # kind, id, a, b
FILL, DONE = 1, 2


@dataclass(frozen=True, slots=True)
class Fill:
    id: int
    offset: int
    count: int


@dataclass(frozen=True, slots=True)
class Done:
    id: int
    errno: int


def fill(id: int, offset: int, count: int) -> bytes:
    return RECORD.pack(FILL, id, offset, count)


def done(id: int, errno: int = 0) -> bytes:
    return RECORD.pack(DONE, id, errno, 0)


class Decoder:
    """Bytes in (any split), records out; a record of an unknown kind is a protocol error."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Fill | Done]:
        self._buf += data
        out: list[Fill | Done] = []
        n = len(self._buf) - len(self._buf) % RECORD.size
        for pos in range(0, n, RECORD.size):
            kind, ident, a, b = RECORD.unpack_from(self._buf, pos)
            if kind == FILL:
                out.append(Fill(ident, a, b))
            elif kind == DONE and a < 4096:
                out.append(Done(ident, a))
            else:
                raise ErofsMountError(f"fanotify link: bad record kind {kind}", errno=_errno.EPROTO)
        del self._buf[:n]
        return out

    @property
    def pending_bytes(self) -> int:
        return len(self._buf)
