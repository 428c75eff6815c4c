"""A small NBD transmission-phase client for host-side tests and benchmarks (trio)."""

from __future__ import annotations

import itertools

import trio

from erofs_mount.backends.nbd import proto


class Reply:
    __slots__ = ("cookie", "error", "data")

    def __init__(self, cookie: int, error: int, data: bytes) -> None:
        self.cookie, self.error, self.data = cookie, error, data


class NbdClient:
    """Sends requests and matches replies by cookie (replies may come out of order)."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.expect: dict[int, int] = {}  # cookie -> data length for READs
        self._cookies = itertools.count(1)

    async def send(self, cmd: int, offset: int = 0, length: int = 0, payload: bytes = b"", cookie: int | None = None) -> int:
        cookie = next(self._cookies) if cookie is None else cookie
        self.expect[cookie] = length if cmd == proto.NBD_CMD_READ else 0
        await self.sendall(proto.pack_request(cmd, cookie, offset, length) + payload)
        return cookie

    async def sendall(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[await self.sock.send(view) :]

    async def _fill(self, n: int) -> None:
        while len(self.buf) < n:
            chunk = await self.sock.recv(1 << 20)
            if not chunk:
                raise EOFError(f"server closed with {len(self.buf)} of {n} bytes buffered")
            self.buf += chunk

    async def reply(self) -> Reply:
        await self._fill(16)
        cookie, error = proto.parse_reply(self.buf)
        del self.buf[:16]
        if cookie not in self.expect:
            raise AssertionError(f"reply for unknown or already answered cookie {cookie:#x}")
        length = self.expect.pop(cookie)
        data = b""
        if error == 0 and length:
            await self._fill(length)
            data = bytes(self.buf[:length])
            del self.buf[:length]
        return Reply(cookie, error, data)

    async def read(self, offset: int, length: int) -> Reply:
        await self.send(proto.NBD_CMD_READ, offset, length)
        return await self.reply()

    async def at_eof(self) -> bool:
        """True when the server closed its side and sent nothing more."""
        if self.buf:
            return False
        return await self.sock.recv(1) == b""
