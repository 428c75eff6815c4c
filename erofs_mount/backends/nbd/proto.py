"""The NBD transmission phase, sans-I/O (pure: no sockets, no trio).

Only the part of the protocol the Linux kernel client speaks after a
netlink/ioctl handover: fixed 28-byte requests and simple 16-byte replies
(``include/uapi/linux/nbd.h``: ``struct nbd_request`` / ``struct nbd_reply``).

    conn = NbdConnection()
    conn.receive_data(chunk)            # b"" = the peer closed the socket
    while (ev := conn.next_event()) is not NEED_DATA:
        ...                             # Request | Disconnect | Closed
        wire = conn.reply(ev.cookie, 0, data)   # or reply_header() + data

Rules kept here rather than in the server, so they are tested byte by byte:

* a WRITE's payload is consumed (and discarded, never buffered whole) before
  its ``Request`` is delivered, so a refused write can never desync the stream
  (erofs-utils ``mount/main.c`` ``erofsmount_nbd_loopfn`` does not read it);
* exactly one reply per cookie: replying to an unknown or already answered
  cookie raises instead of corrupting the stream (erofs-utils sends two
  replies for a non-READ);
* the error field is a POSITIVE errno (erofs-utils puts ``-EIO`` on the wire);
* DISC gets no reply (the kernel does not wait for one).

``decide(request)`` is the read-only export's policy: 0 to serve a READ or
acknowledge a FLUSH, EPERM for WRITE/TRIM/WRITE_ZEROES, EINVAL otherwise.
"""

from __future__ import annotations

import errno as _errno
import struct
from dataclasses import dataclass
from typing import Final

from ...errors import ErofsMountError

# include/uapi/linux/nbd.h
NBD_REQUEST_MAGIC: Final = 0x25609513
NBD_REPLY_MAGIC: Final = 0x67446698

NBD_CMD_READ: Final = 0
NBD_CMD_WRITE: Final = 1
NBD_CMD_DISC: Final = 2
NBD_CMD_FLUSH: Final = 3
NBD_CMD_TRIM: Final = 4
NBD_CMD_CACHE: Final = 5  # protocol extension; the kernel never sends it
NBD_CMD_WRITE_ZEROES: Final = 6

NBD_CMD_MASK_COMMAND: Final = 0x0000FFFF
NBD_CMD_FLAG_FUA: Final = 1 << 16
NBD_CMD_FLAG_NO_HOLE: Final = 1 << 17

# server ("transmission") flags, NBD_ATTR_SERVER_FLAGS / NBD_SET_FLAGS
NBD_FLAG_HAS_FLAGS: Final = 1 << 0
NBD_FLAG_READ_ONLY: Final = 1 << 1
NBD_FLAG_SEND_FLUSH: Final = 1 << 2
NBD_FLAG_SEND_FUA: Final = 1 << 3
NBD_FLAG_ROTATIONAL: Final = 1 << 4
NBD_FLAG_SEND_TRIM: Final = 1 << 5
NBD_FLAG_SEND_WRITE_ZEROES: Final = 1 << 6
NBD_FLAG_CAN_MULTI_CONN: Final = 1 << 8

# client flags, NBD_ATTR_CLIENT_FLAGS
NBD_CFLAG_DESTROY_ON_DISCONNECT: Final = 1 << 0
NBD_CFLAG_DISCONNECT_ON_CLOSE: Final = 1 << 1

REQUEST = struct.Struct(">IIQQI")  # magic, type (flags << 16 | cmd), cookie, from, len
REPLY = struct.Struct(">IIQ")  # magic, error, cookie
assert REQUEST.size == 28 and REPLY.size == 16  # like the kernel's BUILD_BUG_ON

COMMAND_NAMES: Final = {
    NBD_CMD_READ: "READ",
    NBD_CMD_WRITE: "WRITE",
    NBD_CMD_DISC: "DISC",
    NBD_CMD_FLUSH: "FLUSH",
    NBD_CMD_TRIM: "TRIM",
    NBD_CMD_CACHE: "CACHE",
    NBD_CMD_WRITE_ZEROES: "WRITE_ZEROES",
}


def protocol_error(message: str) -> ErofsMountError:
    """The peer broke the NBD framing (bad magic, truncated request, reply misuse)."""
    return ErofsMountError(message, errno=_errno.EPROTO)


class _NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()


@dataclass(frozen=True, slots=True)
class Request:
    """One request that needs exactly one reply (every command but DISC)."""

    cmd: int
    flags: int
    cookie: int
    offset: int
    length: int

    @property
    def name(self) -> str:
        return COMMAND_NAMES.get(self.cmd, f"CMD_{self.cmd}")


@dataclass(frozen=True, slots=True)
class Disconnect:
    """NBD_CMD_DISC: the client asks us to close; no reply is sent."""

    cookie: int


@dataclass(frozen=True, slots=True)
class Closed:
    """The peer closed the socket between two requests (clean EOF)."""


Event = Request | Disconnect | Closed


def decide(request: Request) -> int:
    """The errno a read-only export answers ``request`` with (0 = serve / ok)."""
    if request.cmd == NBD_CMD_READ:
        return 0
    if request.cmd == NBD_CMD_FLUSH:
        return 0  # nothing is ever dirty
    if request.cmd in (NBD_CMD_WRITE, NBD_CMD_TRIM, NBD_CMD_WRITE_ZEROES):
        return _errno.EPERM
    return _errno.EINVAL


def pack_reply(cookie: int, error: int = 0) -> bytes:
    """A simple reply header; ``error`` must be a positive errno or 0."""
    if error < 0:
        raise ValueError("NBD replies carry a positive errno")
    return REPLY.pack(NBD_REPLY_MAGIC, error, cookie)


class NbdConnection:
    """Server side of one transmission-phase connection."""

    __slots__ = ("_buf", "_eof", "_pending", "_skip", "_held", "_done")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._eof = False
        self._pending: set[int] = set()  # cookies delivered and not answered yet
        self._skip = 0  # WRITE payload bytes still to discard
        self._held: Request | None = None  # the WRITE whose payload is being skipped
        self._done = False  # Disconnect or Closed was delivered

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if self._eof:
            raise protocol_error("nbd: data received after EOF")
        if not data:
            self._eof = True
            return
        if self._skip:
            n = min(self._skip, len(data))
            self._skip -= n
            data = memoryview(data)[n:]
            if not data:
                return
        self._buf += data

    def next_event(self) -> Event | _NeedData:
        if self._done:
            return NEED_DATA
        if self._held is not None:
            if self._skip:
                if self._eof:
                    raise protocol_error("nbd: connection closed inside a WRITE payload")
                return NEED_DATA
            req, self._held = self._held, None
            self._pending.add(req.cookie)
            return req
        buf = self._buf
        if len(buf) < REQUEST.size:
            if not self._eof:
                return NEED_DATA
            if buf:
                raise protocol_error(f"nbd: connection closed inside a request header ({len(buf)} of 28 bytes)")
            self._done = True
            return Closed()
        magic, typ, cookie, offset, length = REQUEST.unpack_from(buf)
        if magic != NBD_REQUEST_MAGIC:
            raise protocol_error(f"nbd: bad request magic {magic:#010x}")
        del buf[: REQUEST.size]
        cmd = typ & NBD_CMD_MASK_COMMAND
        flags = typ & ~NBD_CMD_MASK_COMMAND
        if cmd == NBD_CMD_DISC:
            self._done = True
            return Disconnect(cookie)
        if cookie in self._pending:
            raise protocol_error(f"nbd: cookie {cookie:#x} reused while in flight")
        req = Request(cmd, flags, cookie, offset, length)
        if cmd == NBD_CMD_WRITE and length:
            n = min(length, len(buf))
            del buf[:n]
            self._skip = length - n
            self._held = req
            return self.next_event()
        self._pending.add(cookie)
        return req

    def _answer(self, cookie: int) -> None:
        try:
            self._pending.remove(cookie)
        except KeyError:
            raise protocol_error(f"nbd: reply to cookie {cookie:#x} that is not in flight") from None

    def reply_header(self, cookie: int, error: int = 0) -> bytes:
        """Answer ``cookie``; the caller sends the READ data right after it."""
        header = pack_reply(cookie, error)
        self._answer(cookie)
        return header

    def reply(self, cookie: int, error: int = 0, data: bytes = b"") -> bytes:
        """Header + data in one buffer (data only for a successful READ)."""
        header = pack_reply(cookie, error)
        if error and data:
            raise ValueError("an error reply carries no data")
        self._answer(cookie)
        return header + data if data else header


def pack_request(cmd: int, cookie: int, offset: int = 0, length: int = 0, flags: int = 0) -> bytes:
    """Client side, for tests and benchmarks: one request header."""
    return REQUEST.pack(NBD_REQUEST_MAGIC, flags | cmd, cookie, offset, length)


def parse_reply(data: bytes | bytearray | memoryview) -> tuple[int, int]:
    """Client side: (cookie, error) of a 16-byte reply header."""
    magic, error, cookie = REPLY.unpack_from(data)
    if magic != NBD_REPLY_MAGIC:
        raise protocol_error(f"nbd: bad reply magic {magic:#010x}")
    return cookie, error
