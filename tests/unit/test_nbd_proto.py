"""Pure NBD transmission protocol: whole, byte by byte, with trailing bytes, every command."""

from __future__ import annotations

import errno

import pytest

from erofs_mount.backends.nbd import proto
from erofs_mount.backends.nbd.proto import (
    NBD_CMD_DISC,
    NBD_CMD_FLUSH,
    NBD_CMD_READ,
    NBD_CMD_TRIM,
    NBD_CMD_WRITE,
    NBD_CMD_WRITE_ZEROES,
    NEED_DATA,
    Closed,
    Disconnect,
    NbdConnection,
    Request,
    pack_request,
    parse_reply,
)
from erofs_mount.errors import ErofsMountError

# A stream with every command the kernel can send, plus an unknown one and a WRITE payload.
PAYLOAD = bytes(range(256)) * 5  # 1280 bytes, contains the request magic nowhere aligned
STREAM_PARTS = [
    pack_request(NBD_CMD_READ, 1, 4096, 512),
    pack_request(NBD_CMD_WRITE, 2, 0, len(PAYLOAD), flags=proto.NBD_CMD_FLAG_FUA) + PAYLOAD,
    pack_request(NBD_CMD_FLUSH, 3),
    pack_request(NBD_CMD_TRIM, 4, 8192, 4096),
    pack_request(NBD_CMD_WRITE_ZEROES, 5, 0, 4096, flags=proto.NBD_CMD_FLAG_NO_HOLE),
    pack_request(proto.NBD_CMD_CACHE, 6, 0, 4096),
    pack_request(0x77, 7, 0, 0),
    pack_request(NBD_CMD_WRITE, 8, 0, 0),  # empty write: no payload at all
    pack_request(NBD_CMD_READ, 0xFFFFFFFFFFFFFFFF, 2**63, 2**32 - 1),
    pack_request(NBD_CMD_DISC, 9),
]
STREAM = b"".join(STREAM_PARTS)
EXPECTED = [
    Request(NBD_CMD_READ, 0, 1, 4096, 512),
    Request(NBD_CMD_WRITE, proto.NBD_CMD_FLAG_FUA, 2, 0, len(PAYLOAD)),
    Request(NBD_CMD_FLUSH, 0, 3, 0, 0),
    Request(NBD_CMD_TRIM, 0, 4, 8192, 4096),
    Request(NBD_CMD_WRITE_ZEROES, proto.NBD_CMD_FLAG_NO_HOLE, 5, 0, 4096),
    Request(proto.NBD_CMD_CACHE, 0, 6, 0, 4096),
    Request(0x77, 0, 7, 0, 0),
    Request(NBD_CMD_WRITE, 0, 8, 0, 0),
    Request(NBD_CMD_READ, 0, 0xFFFFFFFFFFFFFFFF, 2**63, 2**32 - 1),
    Disconnect(9),
]
DECISIONS = [0, errno.EPERM, 0, errno.EPERM, errno.EPERM, errno.EINVAL, errno.EINVAL, errno.EPERM, 0]


def drain(conn: NbdConnection) -> list:
    out = []
    for _ in range(10_000):
        ev = conn.next_event()
        if ev is NEED_DATA:
            return out
        out.append(ev)
    raise AssertionError("next_event never returned NEED_DATA")


def feed(chunks) -> list:
    conn = NbdConnection()
    events = []
    for chunk in chunks:
        conn.receive_data(chunk)
        events += drain(conn)
    return events


def test_request_and_reply_sizes():
    assert proto.REQUEST.size == 28
    assert proto.REPLY.size == 16
    assert len(pack_request(NBD_CMD_READ, 1, 0, 0)) == 28


def test_whole_stream():
    assert feed([STREAM]) == EXPECTED


def test_byte_by_byte():
    assert feed(STREAM[i : i + 1] for i in range(len(STREAM))) == EXPECTED


@pytest.mark.parametrize("size", [3, 27, 28, 29, 100, 1000])
def test_chunked(size):
    assert feed(STREAM[i : i + size] for i in range(0, len(STREAM), size)) == EXPECTED


def test_trailing_bytes_after_disc_are_ignored():
    conn = NbdConnection()
    conn.receive_data(STREAM + b"garbage after the disconnect")
    assert drain(conn) == EXPECTED
    assert conn.next_event() is NEED_DATA


def test_trailing_partial_request_waits():
    conn = NbdConnection()
    first = pack_request(NBD_CMD_READ, 1, 0, 4096)
    conn.receive_data(first + first[:10])
    assert drain(conn) == [Request(NBD_CMD_READ, 0, 1, 0, 4096)]
    conn.receive_data(pack_request(NBD_CMD_READ, 2, 0, 4096)[10:])
    assert drain(conn) == [Request(NBD_CMD_READ, 0, 2, 0, 4096)]


def test_decide_every_command():
    requests = [e for e in EXPECTED if isinstance(e, Request)]
    assert [proto.decide(r) for r in requests] == DECISIONS


def test_clean_eof_between_requests():
    conn = NbdConnection()
    conn.receive_data(pack_request(NBD_CMD_READ, 1, 0, 512))
    conn.receive_data(b"")
    assert drain(conn) == [Request(NBD_CMD_READ, 0, 1, 0, 512), Closed()]


def test_eof_on_empty_connection():
    conn = NbdConnection()
    conn.receive_data(b"")
    assert drain(conn) == [Closed()]


@pytest.mark.parametrize("cut", [1, 27])
def test_eof_inside_header_is_a_protocol_error(cut):
    conn = NbdConnection()
    conn.receive_data(pack_request(NBD_CMD_READ, 1, 0, 512)[:cut])
    conn.receive_data(b"")
    with pytest.raises(ErofsMountError) as info:
        conn.next_event()
    assert info.value.errno == errno.EPROTO


def test_eof_inside_write_payload_is_a_protocol_error():
    conn = NbdConnection()
    conn.receive_data(pack_request(NBD_CMD_WRITE, 1, 0, 100) + b"x" * 50)
    assert drain(conn) == []
    conn.receive_data(b"")
    with pytest.raises(ErofsMountError):
        conn.next_event()


def test_bad_magic():
    conn = NbdConnection()
    conn.receive_data(b"\x00" * 28)
    with pytest.raises(ErofsMountError) as info:
        conn.next_event()
    assert "magic" in str(info.value)


def test_data_after_eof_refused():
    conn = NbdConnection()
    conn.receive_data(b"")
    with pytest.raises(ErofsMountError):
        conn.receive_data(b"x")


def test_write_payload_never_buffered_whole():
    conn = NbdConnection()
    conn.receive_data(pack_request(NBD_CMD_WRITE, 1, 0, 10 * 2**20))
    assert drain(conn) == []
    for _ in range(9):
        conn.receive_data(b"\0" * 2**20)
        assert drain(conn) == []
        assert len(conn._buf) == 0
    conn.receive_data(b"\0" * 2**20)
    assert drain(conn) == [Request(NBD_CMD_WRITE, 0, 1, 0, 10 * 2**20)]


def test_write_payload_that_looks_like_requests_does_not_desync():
    fake = pack_request(NBD_CMD_READ, 99, 0, 4096) * 3
    stream = pack_request(NBD_CMD_WRITE, 1, 0, len(fake)) + fake + pack_request(NBD_CMD_READ, 2, 0, 512)
    for size in (1, 7, 28, len(stream)):
        events = feed(stream[i : i + size] for i in range(0, len(stream), size))
        assert events == [Request(NBD_CMD_WRITE, 0, 1, 0, len(fake)), Request(NBD_CMD_READ, 0, 2, 0, 512)]


def test_exactly_one_reply_per_cookie():
    conn = NbdConnection()
    conn.receive_data(pack_request(NBD_CMD_READ, 5, 0, 4) + pack_request(NBD_CMD_WRITE, 6, 0, 0))
    r1, r2 = drain(conn)
    assert conn.in_flight == 2
    wire = conn.reply(r1.cookie, 0, b"abcd")
    assert parse_reply(wire) == (5, 0) and wire[16:] == b"abcd"
    with pytest.raises(ErofsMountError):
        conn.reply(r1.cookie, 0, b"abcd")
    err = conn.reply_header(r2.cookie, proto.decide(r2))
    assert parse_reply(err) == (6, errno.EPERM)
    assert conn.in_flight == 0
    with pytest.raises(ErofsMountError):
        conn.reply_header(12345)


def test_out_of_order_replies():
    conn = NbdConnection()
    conn.receive_data(b"".join(pack_request(NBD_CMD_READ, c, 0, 0) for c in (1, 2, 3)))
    assert len(drain(conn)) == 3
    for c in (3, 1, 2):
        assert parse_reply(conn.reply_header(c)) == (c, 0)


def test_reused_cookie_in_flight_is_refused():
    conn = NbdConnection()
    conn.receive_data(pack_request(NBD_CMD_READ, 1, 0, 0) * 2)
    assert conn.next_event() == Request(NBD_CMD_READ, 0, 1, 0, 0)
    with pytest.raises(ErofsMountError):
        conn.next_event()


def test_reply_errno_is_positive_on_the_wire():
    wire = proto.pack_reply(7, errno.EIO)
    assert wire[4:8] == errno.EIO.to_bytes(4, "big")
    with pytest.raises(ValueError):
        proto.pack_reply(7, -errno.EIO)


def test_error_reply_carries_no_data():
    conn = NbdConnection()
    conn.receive_data(pack_request(NBD_CMD_READ, 1, 0, 4))
    drain(conn)
    with pytest.raises(ValueError):
        conn.reply(1, errno.EIO, b"abcd")
    assert conn.in_flight == 1  # nothing was answered


def test_no_event_after_disconnect():
    conn = NbdConnection()
    conn.receive_data(pack_request(NBD_CMD_DISC, 1) + pack_request(NBD_CMD_READ, 2, 0, 0))
    assert drain(conn) == [Disconnect(1)]


def test_proto_imports_no_io_libraries():
    import ast
    import pathlib

    for name in ("proto.py", "recovery.py"):
        tree = ast.parse(pathlib.Path(proto.__file__).with_name(name).read_text())
        mods = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        mods |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not mods & {"trio", "httpx", "pyfuse3", "pyroute2", "socket", "os"}, (name, mods)
