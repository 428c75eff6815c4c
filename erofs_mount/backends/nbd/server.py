"""The trio NBD server: serves one kernel socket from one block source.

Rules (see ``proto.py`` for the framing):

* many requests in flight; replies serialized by a ``trio.StrictFIFOLock``,
  out of order allowed;
* a READ is fetched completely before its reply header is sent (so a failed
  fetch becomes an EIO reply, never a desynced stream; erofs-utils
  ``erofsmount_nbd_loopfn`` sends the header first), then header + data go out
  in one send;
* local sources (``fileno()``) are served inline with ``os.sendfile`` from the
  image fd (``zero_copy="sendfile"``, the default) or with ``preadv`` into a
  preallocated buffer and one ``sendmsg`` (``zero_copy="pread"``); a regular
  file is checked with ``fstat`` first so a truncated image yields EIO;
* bytes between the source's end and the block-rounded export size read as zeros;
* writes/trim → EPERM, unknown → EINVAL, FLUSH → 0; DISC or EOF → clean return.
"""

from __future__ import annotations

import errno as _errno
import logging
import os
import socket as _socket
import stat
from dataclasses import dataclass, field
from typing import Any

import trio

from ...errors import ErofsMountError, errno_of
from .proto import (
    NBD_CMD_READ,
    NEED_DATA,
    Closed,
    Disconnect,
    NbdConnection,
    Request,
    decide,
)

log = logging.getLogger("erofs_mount.nbd")

RECV_SIZE = 256 * 1024
DRAIN_SECONDS = 10.0  # how long in-flight reads may finish after DISC/EOF
_ZEROS = bytes(128 * 1024)
_SOCKET_GONE = (trio.BrokenResourceError, trio.ClosedResourceError, BrokenPipeError, ConnectionResetError)


@dataclass(slots=True)
class ServerStats:
    requests: int = 0
    reads: int = 0
    bytes_read: int = 0
    read_errors: int = 0
    refused: int = 0
    max_in_flight: int = 0
    end: str = ""  # "disconnect", "eof", "socket", "protocol"
    extra: dict[str, Any] = field(default_factory=dict)


class _AbortConnection(Exception):
    """The stream can no longer be kept in sync: drop the connection."""


async def _send_all(sock: trio.socket.SocketType, data: bytes | memoryview, flags: int = 0) -> None:
    view = memoryview(data)
    while view:
        n = await sock.send(view, flags)
        view = view[n:]


async def _sendmsg_all(sock: trio.socket.SocketType, header: bytes, body: memoryview) -> None:
    total = len(header) + len(body)
    n = await sock.sendmsg([header, body])
    if n < total:  # rare: the socket buffer filled up
        rest = (memoryview(header)[n:].tobytes() + body) if n < len(header) else body[n - len(header) :]
        await _send_all(sock, rest)


async def _send_zeros(sock: trio.socket.SocketType, count: int) -> None:
    while count:
        n = min(count, len(_ZEROS))
        await _send_all(sock, memoryview(_ZEROS)[:n])
        count -= n


class _Server:
    def __init__(self, sock: Any, source: Any, export_size: int, zero_copy: str, max_in_flight: int) -> None:
        self.sock = sock
        self.source = source
        self.export_size = export_size
        self.conn = NbdConnection()
        self.lock = trio.StrictFIFOLock()
        self.stats = ServerStats()
        self.limit = trio.Semaphore(max_in_flight)
        self.fd: int | None = None
        self.regular = False
        if zero_copy != "off" and hasattr(source, "fileno"):
            self.fd = source.fileno()
            self.regular = stat.S_ISREG(os.fstat(self.fd).st_mode)
        self.mode = zero_copy if self.fd is not None else "async"
        self.buf = bytearray(0)

    # -- replies -------------------------------------------------------------------------------
    async def _reply_error(self, req: Request, err: int) -> None:
        async with self.lock:
            await _send_all(self.sock, self.conn.reply_header(req.cookie, err))

    def _check(self, req: Request) -> int:
        if req.offset + req.length > self.export_size:
            return _errno.EINVAL
        return 0

    async def _read_local(self, req: Request) -> None:
        """Inline zero-copy/pread path for a local file (the whole reply under the lock)."""
        fd = self.fd
        assert fd is not None
        avail = max(0, min(req.offset + req.length, self.source.size) - req.offset)
        if avail and self.regular and os.fstat(fd).st_size < req.offset + avail:
            self._read_failed(req, f"image shrank below {req.offset + avail} bytes")
            await self._reply_error(req, _errno.EIO)
            return
        async with self.lock:
            if self.mode == "pread":
                if len(self.buf) < req.length:
                    self.buf = bytearray(max(req.length, 128 * 1024))
                view = memoryview(self.buf)[: req.length]
                try:
                    n = os.preadv(fd, [view[:avail]], req.offset) if avail else 0
                except OSError as exc:
                    n = -exc.errno
                if n != avail:
                    self._read_failed(req, f"pread returned {n} of {avail}")
                    await _send_all(self.sock, self.conn.reply_header(req.cookie, _errno.EIO))
                    return
                if req.length > avail:
                    view[avail:] = bytes(req.length - avail)
                await _sendmsg_all(self.sock, self.conn.reply_header(req.cookie, 0), view)
            else:
                header = self.conn.reply_header(req.cookie, 0)
                await _send_all(self.sock, header, _socket.MSG_MORE if avail else 0)
                sockfd = self.sock.fileno()
                off, left = req.offset, avail
                while left:
                    try:
                        n = os.sendfile(sockfd, fd, off, left)
                    except BlockingIOError:
                        await trio.lowlevel.wait_writable(self.sock)
                        continue
                    if n == 0:  # the file shrank after the fstat check: the header is out
                        raise _AbortConnection(f"image shrank while sending cookie {req.cookie:#x}")
                    off += n
                    left -= n
                if req.length > avail:
                    await _send_zeros(self.sock, req.length - avail)
        self.stats.reads += 1
        self.stats.bytes_read += req.length

    async def _read_async(self, req: Request) -> None:
        """Any source: fetch completely, then header + data in one send."""
        try:
            avail = max(0, min(req.offset + req.length, self.source.size) - req.offset)
            try:
                data = await self.source.read_at(req.offset, avail) if avail else b""
                if len(data) != avail:
                    raise ErofsMountError(f"short read ({len(data)} of {avail} bytes)")
            except trio.Cancelled:
                raise
            except Exception as exc:  # noqa: BLE001 - every failure becomes one EIO-style reply
                self._read_failed(req, str(exc) or type(exc).__name__)
                err = errno_of(exc)
                await self._reply_error(req, err if 0 < err < 4096 else _errno.EIO)
                return
            if req.length > avail:
                data = bytes(data) + bytes(req.length - avail)
            async with self.lock:
                await _send_all(self.sock, self.conn.reply(req.cookie, 0, data))
            self.stats.reads += 1
            self.stats.bytes_read += req.length
        except _SOCKET_GONE:
            pass  # the reader loop sees it too
        finally:
            self.limit.release()

    def _read_failed(self, req: Request, why: str) -> None:
        self.stats.read_errors += 1
        log.error("nbd: READ offset=%d length=%d failed: %s -> EIO", req.offset, req.length, why)

    # -- the reader loop -----------------------------------------------------------------------
    async def run(self, nursery: trio.Nursery) -> str:
        conn, stats = self.conn, self.stats
        while True:
            try:
                data = await self.sock.recv(RECV_SIZE)
            except _SOCKET_GONE + (OSError,):
                return "socket"
            conn.receive_data(data)
            while True:
                ev = conn.next_event()
                if ev is NEED_DATA:
                    break
                if isinstance(ev, Disconnect):
                    return "disconnect"
                if isinstance(ev, Closed):
                    return "eof"
                assert isinstance(ev, Request)
                stats.requests += 1
                err = decide(ev) or self._check(ev)
                if err or ev.cmd != NBD_CMD_READ:
                    if err:
                        stats.refused += 1
                        log.info("nbd: %s offset=%d length=%d refused: %s", ev.name, ev.offset, ev.length,
                                 _errno.errorcode.get(err, err))
                    await self._reply_error(ev, err)
                elif self.mode != "async":
                    await self._read_local(ev)
                else:
                    await self.limit.acquire()
                    nursery.start_soon(self._read_async, ev)
                    stats.max_in_flight = max(stats.max_in_flight, conn.in_flight)


SEND_BUFFER = 8 << 20  # a whole large READ reply fits: one sendfile, no EAGAIN round trips
_SO_SNDBUFFORCE = getattr(_socket, "SO_SNDBUFFORCE", 32)


def _grow_send_buffer(sock: Any) -> None:
    for opt in (_SO_SNDBUFFORCE, _socket.SO_SNDBUF):  # FORCE needs CAP_NET_ADMIN, else capped by wmem_max
        try:
            sock.setsockopt(_socket.SOL_SOCKET, opt, SEND_BUFFER)
            return
        except OSError:
            continue


async def serve_nbd(
    sock: trio.socket.SocketType,
    source: Any,
    *,
    export_size: int | None = None,
    zero_copy: str = "sendfile",
    max_in_flight: int = 64,
    task_status: trio.TaskStatus[ServerStats] = trio.TASK_STATUS_IGNORED,
) -> ServerStats:
    """Serve ``sock`` until DISC/EOF (or the socket breaks); return the statistics.

    ``zero_copy``: "sendfile" (default), "pread" (preallocated buffer) or "off" (always
    ``await source.read_at``); the first two apply only to sources with ``fileno()``.
    """
    if zero_copy not in ("sendfile", "pread", "off"):
        raise ValueError(f"zero_copy={zero_copy!r}")
    _grow_send_buffer(sock)
    server = _Server(sock, source, source.size if export_size is None else export_size, zero_copy, max_in_flight)
    server.stats.extra["mode"] = server.mode
    async with trio.open_nursery() as nursery:
        task_status.started(server.stats)
        try:
            server.stats.end = await server.run(nursery)
        except _SOCKET_GONE:
            server.stats.end = "socket"
        except _AbortConnection as exc:
            log.error("nbd: %s; dropping the connection", exc)
            server.stats.end = "abort"
        except ErofsMountError as exc:
            log.error("nbd: %s; dropping the connection", exc)
            server.stats.end = "protocol"
        # let reads already in flight finish (bounded), then stop
        nursery.cancel_scope.deadline = trio.current_time() + DRAIN_SECONDS
    log.info("nbd: connection ended (%s): %d requests, %d bytes read, %d read errors, %d refused",
             server.stats.end, server.stats.requests, server.stats.bytes_read, server.stats.read_errors,
             server.stats.refused)
    return server.stats
