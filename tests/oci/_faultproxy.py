"""A trio + h11 reverse proxy on real sockets that injects faults, for retry tests and benchmarks.

Faults (``Fault.kind``), each applied to one matching request (``proxy.faults``
is a queue) or to all of them (``proxy.always``):

    status          answer ``status`` (with Retry-After if given) without asking upstream
    close           close the connection before answering (FIN)
    reset           reset the connection before answering (RST)
    stall_headers   answer nothing for ``seconds``
    drop_range      forward without the Range header (upstream answers 200 + the whole blob)
    reset_mid_body  forward headers and ``fraction`` of the body, then RST
    truncate        forward headers and ``fraction`` of the body, then FIN
    stall_body      forward headers and ``fraction`` of the body, then nothing for ``seconds``
    slow_body       forward the body in small pieces with pauses
    corrupt         forward, with the byte at blob offset ``offset`` flipped when the body holds it
                    (``times`` bodies, -1: every one; set it as ``proxy.always``)

``delay`` adds latency to every request (benchmarks: 20 ms per round trip).
"""

from __future__ import annotations

import socket
import struct
import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable

import h11
import trio


@dataclass
class Fault:
    kind: str
    status: int = 503
    retry_after: str | None = None
    fraction: float = 0.5
    seconds: float = 30.0
    offset: int = -1
    times: int = -1


def default_match(method: str, target: str) -> bool:
    return method == "GET" and "/blobs/" in target


class FaultProxy:
    def __init__(self, upstream_host: str, upstream_port: int, *, delay: float = 0.0,
                 match: Callable[[str, str], bool] = default_match) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.delay = delay
        self.match = match
        self.faults: deque[Fault] = deque()
        self.always: Fault | None = None
        self.log: list[tuple[str, str, str | None]] = []
        self.ranges: list[str | None] = []  # the Range header of each logged request
        self.corrupted = 0  # bodies a "corrupt" fault changed
        self.port = 0
        self._ups: dict[int, trio.SocketStream | None] = {}

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def requests(self, kind: str | None = "any") -> list:
        return [e for e in self.log if kind == "any" or e[2] == kind]

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self)
        await trio.serve_listeners(self._handle, listeners)

    def _pick(self, method: str, target: str) -> Fault | None:
        if not self.match(method, target):
            return None
        if self.faults:
            return self.faults.popleft()
        return self.always

    async def _handle(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        self._ups[id(stream)] = None  # one kept-alive upstream connection per client connection
        try:
            while True:
                req = await _next(conn, stream)
                if not isinstance(req, h11.Request):
                    return
                while not isinstance(await _next(conn, stream), (h11.EndOfMessage, h11.ConnectionClosed)):
                    pass  # request bodies are not used by the clients under test
                method, target = req.method.decode(), req.target.decode()
                fault = self._pick(method, target)
                self.log.append((method, target, fault.kind if fault else None))
                self.ranges.append(next((v.decode() for k, v in req.headers if k.lower() == b"range"), None))
                if self.delay:
                    await trio.sleep(self.delay)
                if not await self._respond(conn, stream, req, fault) or conn.our_state is not h11.DONE:
                    return
                if conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError, OSError):
            pass
        finally:
            up = self._ups.pop(id(stream), None)
            if up is not None:
                await trio.aclose_forcefully(up)
            await trio.aclose_forcefully(stream)

    async def _upstream_response(self, key: int, request: bytes) -> tuple:
        """(upstream stream, its h11 connection, Response) on a kept-alive connection, or a fresh one."""
        for attempt in (0, 1):
            up = self._ups.get(key)
            if up is None:
                up = await trio.open_tcp_stream(*self.upstream)
                self._ups[key] = up
            uconn = h11.Connection(h11.CLIENT)
            try:
                await up.send_all(request)
                resp = await _next(uconn, up)
            except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError, OSError):
                resp = None
            if isinstance(resp, h11.Response):
                return up, uconn, resp
            self._ups[key] = None  # stale kept-alive connection: reconnect once
            await trio.aclose_forcefully(up)
        return None, None, None

    async def _respond(self, conn: h11.Connection, stream: trio.SocketStream, req: h11.Request,
                       fault: Fault | None) -> bool:
        kind = fault.kind if fault else None
        if kind == "status":
            headers = [("Content-Type", "text/plain"), ("Content-Length", "6")]
            if fault.retry_after is not None:
                headers.append(("Retry-After", fault.retry_after))
            await stream.send_all(conn.send(h11.Response(status_code=fault.status, headers=headers)))
            await stream.send_all(conn.send(h11.Data(data=b"fault\n")) + conn.send(h11.EndOfMessage()))
            return True
        if kind == "close":
            return False
        if kind == "reset":
            _rst(stream)
            return False
        if kind == "stall_headers":
            await trio.sleep(fault.seconds)
            return False
        headers = [(k, v) for k, v in req.headers if not (kind == "drop_range" and k.lower() == b"range")]
        proto = h11.Connection(h11.CLIENT)
        request = proto.send(h11.Request(method=req.method, target=req.target, headers=headers)) + proto.send(
            h11.EndOfMessage())
        key = id(stream)
        up, uconn, resp = await self._upstream_response(key, request)
        if resp is None:
            return False
        clean = False
        try:
            hdrs = dict(resp.headers)
            length = int(hdrs.get(b"content-length", b"0") or 0)
            await stream.send_all(conn.send(h11.Response(status_code=resp.status_code, headers=resp.headers,
                                                          reason=resp.reason)))
            cut = int(length * fault.fraction) if kind in ("reset_mid_body", "truncate", "stall_body") else None
            base = _range_start(hdrs)
            if req.method == b"HEAD":
                # no body follows a HEAD response; uconn never saw the request, so it would wait for
                # the announced Content-Length (and the client's next request would hang)
                await stream.send_all(conn.send(h11.EndOfMessage()))
                clean = True
                return True
            if b"transfer-encoding" in hdrs:
                clean = await self._forward_events(conn, stream, uconn, up)
                return clean
            # Content-Length body: forward the raw bytes (no parsing: the proxy must stay cheap)
            sent = 0
            pending = bytes(uconn.trailing_data[0])
            while sent < length:
                data = pending or await up.receive_some(262144)
                pending = b""
                if not data:
                    return False
                if len(data) > length - sent:
                    return False  # more than announced: not reusable
                if cut is not None and sent + len(data) >= cut:
                    await stream.send_all(conn.send(h11.Data(data=data[:cut - sent])))
                    if kind == "reset_mid_body":
                        _rst(stream)
                    elif kind == "stall_body":
                        await trio.sleep(fault.seconds)
                    return False
                if kind == "corrupt" and fault.times != 0 and base + sent <= fault.offset < base + sent + len(data):
                    at = fault.offset - base - sent
                    data = data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:]
                    fault.times -= fault.times > 0
                    self.corrupted += 1
                if kind == "slow_body":
                    for i in range(0, len(data), 16384):
                        await stream.send_all(conn.send(h11.Data(data=data[i:i + 16384])))
                        await trio.sleep(0.01)
                else:
                    await stream.send_all(conn.send(h11.Data(data=data)))
                sent += len(data)
            await stream.send_all(conn.send(h11.EndOfMessage()))
            clean = not any(k.lower() == b"connection" and v.lower() == b"close" for k, v in resp.headers)
            return True
        finally:
            if not clean:  # the upstream connection is mid-message or closing: never reuse it
                self._ups[key] = None
                await trio.aclose_forcefully(up)

    @staticmethod
    async def _forward_events(conn: h11.Connection, stream: trio.SocketStream, uconn: h11.Connection,
                              up: trio.SocketStream) -> bool:
        while True:
            ev = await _next(uconn, up)
            if isinstance(ev, h11.Data):
                await stream.send_all(conn.send(h11.Data(data=bytes(ev.data))))
            elif isinstance(ev, h11.EndOfMessage):
                await stream.send_all(conn.send(h11.EndOfMessage()))
                return True
            else:
                return False


async def _next(conn: h11.Connection, stream: trio.SocketStream):
    while True:
        ev = conn.next_event()
        if ev is not h11.NEED_DATA:
            return ev
        data = await stream.receive_some(65536)
        conn.receive_data(data)  # b"" = EOF


def _range_start(headers: dict) -> int:
    """The blob offset a response body starts at (Content-Range of a 206; 0 for a whole blob)."""
    cr = headers.get(b"content-range", b"").decode()
    if cr.startswith("bytes ") and "-" in cr:
        try:
            return int(cr[6:].split("-", 1)[0])
        except ValueError:
            return 0
    return 0


def _rst(stream: trio.SocketStream) -> None:
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class ProxyThread:
    """The fault proxy (20 ms per request, all requests logged) in a thread of its own
    (for tests that run the CLI in another process)."""

    def __init__(self, upstream_port: int, delay: float) -> None:
        self.proxy = FaultProxy("127.0.0.1", upstream_port, delay=delay, match=lambda m, t: True)
        self._started = threading.Event()
        self._cancel: trio.CancelScope | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)
        self._thread.start()
        assert self._started.wait(30), "the proxy did not start"

    async def _main(self) -> None:
        with trio.CancelScope() as scope:
            self._cancel, self._token = scope, trio.lowlevel.current_trio_token()
            async with trio.open_nursery() as n:
                await n.start(self.proxy.serve)
                self._started.set()

    def stop(self) -> None:
        if self._cancel is not None:
            trio.from_thread.run_sync(self._cancel.cancel, trio_token=self._token)
        self._thread.join(10)


def proxy_thread(upstream_port: int):
    """A fault-free proxy in its own thread in front of *upstream_port*, stopped at the end: ``yield
    from`` it in a fixture (tests that run the CLI in another process set its faults)."""
    pt = ProxyThread(upstream_port, 0.0)
    try:
        yield pt.proxy
    finally:
        pt.stop()


def main(argv: list[str] | None = None) -> None:
    """``python -m tests.oci._faultproxy UPSTREAM_PORT [DELAY]``: a fault-free proxy with added latency in its
    own process (benchmarks: the proxy must not share the measured client's CPU); prints its port."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    proxy = FaultProxy("127.0.0.1", int(args[0]), delay=float(args[1]) if len(args) > 1 else 0.0,
                       match=lambda m, t: True)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(proxy.serve)
            print(proxy.port, flush=True)

    try:
        trio.run(run)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
