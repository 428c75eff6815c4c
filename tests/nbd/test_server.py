"""The trio NBD server over a socketpair, against a small client (host-side, no kernel)."""

from __future__ import annotations

import errno
import os
import random
import socket

import pytest
import trio

from erofs_mount.backends.nbd import proto
from erofs_mount.sources.local import LocalSource
from erofs_mount.backends.nbd.server import serve_nbd
from erofs_mount.errors import SourceError

from .nbdclient import NbdClient

pytestmark = pytest.mark.trio
MODES = ["sendfile", "pread", "off"]
SIZE = 300_000  # not a multiple of 4096: the export is rounded up


@pytest.fixture
def image(tmp_path):
    data = random.Random(7).randbytes(SIZE)
    path = tmp_path / "img"
    path.write_bytes(data)
    return path, data


class FlakySource:
    """A fake async source: fails reads that touch ``bad`` offsets, delays others."""

    def __init__(self, data: bytes, bad=(), delays=None) -> None:
        self.data, self.size, self.bad, self.delays = data, len(data), set(bad), delays or {}
        self.closed = False

    async def read_at(self, offset: int, length: int) -> bytes:
        await trio.sleep(self.delays.get(offset, 0))
        if offset in self.bad:
            raise SourceError(f"injected failure at {offset}")
        return self.data[offset : offset + length]

    async def aclose(self) -> None:
        self.closed = True

    def stats(self):
        return {}


async def start(nursery, source, export_size=None, zero_copy="sendfile"):
    a, b = socket.socketpair()
    srv_sock = trio.socket.from_stdlib_socket(a)
    cli_sock = trio.socket.from_stdlib_socket(b)
    result = {}

    async def run():
        result["stats"] = await serve_nbd(
            srv_sock, source, export_size=export_size or -(-source.size // 4096) * 4096, zero_copy=zero_copy
        )
        srv_sock.close()

    nursery.start_soon(run)
    return NbdClient(cli_sock), result


@pytest.mark.parametrize("mode", MODES)
async def test_reads_match_the_image(image, mode):
    path, data = image
    src = LocalSource.open(str(path))
    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            client, result = await start(n, src, zero_copy=mode)
            rng = random.Random(1)
            for _ in range(50):
                off = rng.randrange(0, SIZE)
                length = rng.randrange(0, min(200_000, SIZE - off) + 1)
                r = await client.read(off, length)
                assert r.error == 0 and r.data == data[off : off + length]
            await client.send(proto.NBD_CMD_DISC)
            assert await client.at_eof()
    assert result["stats"].end == "disconnect"
    assert result["stats"].extra["mode"] == ("async" if mode == "off" else mode)
    await src.aclose()


@pytest.mark.parametrize("mode", MODES)
async def test_many_in_flight_and_tail_zeros(image, mode):
    path, data = image
    src = LocalSource.open(str(path))
    export = -(-SIZE // 4096) * 4096
    expected = data + bytes(export - SIZE)
    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            client, result = await start(n, src, zero_copy=mode)
            want = {}
            for i in range(16):
                off = (i * 37_000) % (export - 12288)
                c = await client.send(proto.NBD_CMD_READ, off, 4096 * (1 + i % 3))
                want[c] = expected[off : off + 4096 * (1 + i % 3)]
            c = await client.send(proto.NBD_CMD_READ, export - 8192, 8192)  # crosses the source's end
            want[c] = expected[export - 8192 :]
            for _ in range(len(want)):
                r = await client.reply()
                assert r.error == 0 and r.data == want.pop(r.cookie)
            assert not want
            client.sock.shutdown(socket.SHUT_WR)  # EOF instead of DISC
            assert await client.at_eof()
    assert result["stats"].end == "eof"
    await src.aclose()


@pytest.mark.parametrize("mode", MODES)
async def test_every_non_read_command_gets_one_reply_and_no_desync(image, mode):
    path, data = image
    src = LocalSource.open(str(path))
    export = -(-SIZE // 4096) * 4096
    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            client, result = await start(n, src, zero_copy=mode)
            payload = proto.pack_request(proto.NBD_CMD_READ, 999, 0, 4096) * 100  # looks like requests
            sent = {
                await client.send(proto.NBD_CMD_WRITE, 0, len(payload), payload): errno.EPERM,
                await client.send(proto.NBD_CMD_TRIM, 0, 4096): errno.EPERM,
                await client.send(proto.NBD_CMD_WRITE_ZEROES, 0, 4096): errno.EPERM,
                await client.send(proto.NBD_CMD_FLUSH): 0,
                await client.send(proto.NBD_CMD_CACHE, 0, 4096): errno.EINVAL,
                await client.send(0x1F): errno.EINVAL,
                await client.send(proto.NBD_CMD_READ, export - 4096, 8192): errno.EINVAL,  # past the export
                await client.send(proto.NBD_CMD_READ, 2**63, 4096): errno.EINVAL,
            }
            for _ in range(len(sent)):
                r = await client.reply()
                assert r.error == sent.pop(r.cookie)
            r = await client.read(100, 1000)
            assert r.error == 0 and r.data == data[100:1100]
            await client.send(proto.NBD_CMD_DISC)
            assert await client.at_eof()  # no reply to DISC, and nothing else pending
    stats = result["stats"]
    assert stats.refused == 7 and stats.requests == 9
    await src.aclose()


async def test_failed_read_is_eio_and_server_keeps_serving():
    data = random.Random(3).randbytes(64 * 4096)
    src = FlakySource(data, bad={8192})
    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            client, result = await start(n, src)
            r = await client.read(8192, 4096)
            assert r.error == errno.EIO and r.data == b""
            for off in (0, 4096, 12288):
                r = await client.read(off, 4096)
                assert r.error == 0 and r.data == data[off : off + 4096]
            r = await client.read(8192, 4096)
            assert r.error == errno.EIO  # not retried forever, not cached
            await client.send(proto.NBD_CMD_DISC)
    assert result["stats"].read_errors == 2
    assert result["stats"].reads == 3


async def test_replies_out_of_order_with_slow_fetches():
    data = random.Random(4).randbytes(16 * 4096)
    src = FlakySource(data, delays={0: 0.3, 4096: 0.2, 8192: 0.1})
    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            client, result = await start(n, src)
            cookies = [await client.send(proto.NBD_CMD_READ, off, 4096) for off in (0, 4096, 8192, 12288)]
            order = []
            for _ in cookies:
                r = await client.reply()
                order.append(r.cookie)
                off = (cookies.index(r.cookie)) * 4096
                assert r.data == data[off : off + 4096]
            assert sorted(order) == sorted(cookies)
            assert order[0] == cookies[3] and order[-1] == cookies[0]
            await client.send(proto.NBD_CMD_DISC)
    assert result["stats"].max_in_flight >= 2


@pytest.mark.parametrize("mode", MODES)
async def test_truncated_local_image_gives_eio_then_keeps_serving(image, mode):
    path, data = image
    src = LocalSource.open(str(path))
    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            client, result = await start(n, src, zero_copy=mode)
            assert (await client.read(SIZE - 4096, 4096)).data == data[SIZE - 4096 :]
            os.truncate(path, SIZE // 2)
            r = await client.read(SIZE - 4096, 4096)
            assert r.error == errno.EIO
            r = await client.read(0, 4096)
            assert r.error == 0 and r.data == data[:4096]
            await client.send(proto.NBD_CMD_DISC)
    assert result["stats"].read_errors == 1
    await src.aclose()


async def test_bad_magic_drops_the_connection(image):
    path, _ = image
    src = LocalSource.open(str(path))
    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            client, result = await start(n, src)
            await client.sendall(b"\x00" * 28)
            assert await client.at_eof()
    assert result["stats"].end == "protocol"
    await src.aclose()


async def test_peer_reset_ends_the_server(image):
    path, _ = image
    src = LocalSource.open(str(path))
    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            client, result = await start(n, src)
            await client.send(proto.NBD_CMD_READ, 0, 200_000)
            client.sock.close()
    assert result["stats"].end in ("socket", "eof")
    await src.aclose()
