"""fanotify pre-content wire format: hand-built buffers byte by byte, real 6.18 captures, responses, flag sets."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import select
import signal
import struct
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from erofs_mount.backends.fanotify import wire
from erofs_mount.backends.fanotify.wire import (
    FAN_ALLOW,
    FAN_DENY,
    FAN_NOFD,
    FAN_OPEN_PERM,
    FAN_PRE_ACCESS,
    FAN_Q_OVERFLOW,
    Event,
    allow,
    deny,
    parse_events,
)
from erofs_mount.errors import ErofsMountError

META = "=IBBHQii"  # struct fanotify_event_metadata, spelled out again rather than taken from wire


def meta(mask, fd, pid, tail=b"", *, vers=3, metadata_len=24, event_len=None, extra_meta=b""):
    body = extra_meta + tail
    if event_len is None:
        event_len = 24 + len(body)
    return struct.pack(META, event_len, vers, 0, metadata_len, mask, fd, pid) + body


def rng(offset, count, *, length=24):
    """struct fanotify_event_info_range; ``length`` cuts it short or pads it."""
    body = struct.pack("=BBHIQQ", 6, 0, length, 0, offset, count)
    return body[:length] + bytes(max(0, length - 24))


def rec(info_type, payload=b"", *, length=None):
    length = 4 + len(payload) if length is None else length
    return struct.pack("=BBH", info_type, 0, length) + payload


def pidfd_rec(pidfd):
    return rec(4, struct.pack("=i", pidfd))


# Several events in one read(2): range, no range, overflow, pidfd + range, unknown records around a range.
PARTS = [
    meta(FAN_PRE_ACCESS, 7, 100, rng(4096, 8192)),
    meta(FAN_OPEN_PERM, 8, 101),
    meta(FAN_Q_OVERFLOW, FAN_NOFD, 0),
    meta(FAN_PRE_ACCESS, 9, 102, pidfd_rec(11) + rng(0, 65536)),
    meta(FAN_PRE_ACCESS, 10, 103, rec(99, b"abcdefgh") + rng(2 << 40, 4096) + rec(200)),
    meta(FAN_PRE_ACCESS, 12, 104, rng(1 << 20, 0)),  # truncate: count 0
]
BUF = b"".join(PARTS)
EXPECTED = [
    Event(7, FAN_PRE_ACCESS, 100, 4096, 8192),
    Event(8, FAN_OPEN_PERM, 101),
    Event(FAN_NOFD, FAN_Q_OVERFLOW, 0),
    Event(9, FAN_PRE_ACCESS, 102, 0, 65536, pidfd=11),
    Event(10, FAN_PRE_ACCESS, 103, 2 << 40, 4096),
    Event(12, FAN_PRE_ACCESS, 104, 1 << 20, 0),
]
BOUNDARIES = [sum(map(len, PARTS[:i])) for i in range(len(PARTS) + 1)]

# Captured on Linux 6.18.44 (x86-64) by the probes of the research notes: a pread(fd, 100, 5000)
# on a marked ext4 file, the same with FAN_REPORT_PIDFD, and a FAN_PRE_ACCESS followed by the
# overflow event of a group whose queue held one event.
REAL_RANGE = bytes.fromhex("300000000300180000001000000000000400000033420000"
                           "060018000000000000100000000000000010000000000000")
REAL_PIDFD = bytes.fromhex("380000000300180000001000000000000400000034420000"
                           "0400080005000000"
                           "060018000000000000100000000000000010000000000000")
REAL_OVERFLOW = bytes.fromhex("300000000300180000001000000000000700000081460000"
                              "060018000000000000000000000000000010000000000000"
                              "18000000030018000040000000000000ffffffff00000000")


def epro(buf) -> ErofsMountError:
    with pytest.raises(ErofsMountError) as info:
        parse_events(buf)
    assert info.value.errno == errno.EPROTO
    return info.value


# ------------------------------------------------------------------ layouts and constants

def test_struct_sizes_match_the_uapi():
    assert wire.FAN_EVENT_METADATA.size == wire.FAN_EVENT_METADATA_LEN == 24
    assert wire.FAN_EVENT_INFO_HEADER.size == 4
    assert wire.FAN_EVENT_INFO_RANGE.size == 24
    assert wire.FAN_EVENT_INFO_PIDFD.size == 8
    assert wire.FANOTIFY_RESPONSE.size == 8


def test_constants_as_in_linux_6_18():
    assert (wire.FAN_CLASS_PRE_CONTENT, wire.FAN_PRE_ACCESS, wire.FAN_EVENT_INFO_TYPE_RANGE) == (8, 0x100000, 6)
    assert (wire.FAN_Q_OVERFLOW, wire.FANOTIFY_METADATA_VERSION, wire.FAN_NOFD) == (0x4000, 3, -1)
    assert (wire.FAN_UNLIMITED_QUEUE, wire.FAN_REPORT_PIDFD, wire.FAN_REPORT_FD_ERROR) == (0x10, 0x80, 0x2000)
    assert wire.FAN_DENY_ERRNO(errno.EIO) == 0x05000002
    assert wire.FAN_MARK_MNTNS == wire.FAN_MARK_MOUNT | wire.FAN_MARK_FILESYSTEM


# ------------------------------------------------------------------ parsing

def test_whole_buffer():
    assert parse_events(BUF) == EXPECTED


def test_each_event_alone_and_memoryview_input():
    for part, ev in zip(PARTS, EXPECTED):
        assert parse_events(part) == [ev]
        assert parse_events(memoryview(bytearray(part))) == [ev]


def test_empty_read_is_no_event():
    assert parse_events(b"") == []


def test_every_prefix_byte_by_byte():
    """A prefix ending on an event boundary parses; any other is refused, keeping the events before it."""
    for n in range(len(BUF) + 1):
        if n in BOUNDARIES:
            assert parse_events(BUF[:n]) == EXPECTED[:BOUNDARIES.index(n)]
        else:
            exc = epro(BUF[:n])
            assert exc.events == EXPECTED[:max(i for i, b in enumerate(BOUNDARIES) if b < n)]


def test_trailing_garbage_after_whole_events():
    exc = epro(BUF + b"\x00" * 5)
    assert exc.events == EXPECTED


def test_event_properties():
    pre, perm, ovf, *_ = EXPECTED
    assert pre.needs_response and pre.has_range and pre.end == 4096 + 8192 and not pre.is_overflow
    assert perm.needs_response and not perm.has_range and perm.end is None
    assert ovf.is_overflow and not ovf.needs_response


@pytest.mark.parametrize("event_len", [0, 1, 23])
def test_event_len_shorter_than_metadata_never_loops(event_len):
    epro(meta(FAN_PRE_ACCESS, 7, 1, event_len=event_len) + b"\x00" * 64)


def test_event_len_past_the_buffer():
    exc = epro(PARTS[0] + meta(FAN_PRE_ACCESS, 7, 1, rng(0, 4096), event_len=49))
    assert exc.events == EXPECTED[:1]


@pytest.mark.parametrize("vers", [0, 2, 4, 255])
def test_metadata_version_mismatch(vers):
    exc = epro(PARTS[1] + meta(FAN_PRE_ACCESS, 7, 1, rng(0, 4096), vers=vers))
    assert "version" in str(exc) and exc.events == EXPECTED[1:2]


@pytest.mark.parametrize("metadata_len", [0, 8, 23, 49])
def test_bad_metadata_len(metadata_len):
    epro(meta(FAN_PRE_ACCESS, 7, 1, rng(0, 4096), metadata_len=metadata_len))


def test_longer_metadata_is_skipped_by_metadata_len():
    """A future kernel may grow the metadata: info records start at metadata_len."""
    buf = meta(FAN_PRE_ACCESS, 7, 1, rng(8192, 4096), metadata_len=32, extra_meta=b"\xee" * 8)
    assert parse_events(buf) == [Event(7, FAN_PRE_ACCESS, 1, 8192, 4096)]


def test_unknown_records_are_skipped_by_their_length():
    tail = rec(7, struct.pack("=Q", 42)) + rec(1, b"x" * 20) + rec(250) + rng(12288, 4096)
    assert parse_events(meta(FAN_PRE_ACCESS, 3, 9, tail)) == [Event(3, FAN_PRE_ACCESS, 9, 12288, 4096)]


def test_range_record_longer_than_the_struct():
    assert parse_events(meta(FAN_PRE_ACCESS, 3, 9, rng(4096, 4096, length=32)))[0].count == 4096


@pytest.mark.parametrize("tail", [
    rec(99, length=0),                         # would not advance
    rec(99, length=3),                         # shorter than its own header
    rec(99, b"abcd", length=12),               # overruns the event
    b"\x06\x00",                               # truncated header
    rng(0, 4096, length=16),                   # range record too short for its type
    rng(0, 4096) + rng(4096, 4096),            # two ranges
    rec(4, b"\x01\x00", length=6),             # pidfd record too short
    pidfd_rec(5) + pidfd_rec(6),               # two pidfds
], ids=["len0", "len3", "overrun", "trunc-hdr", "short-range", "two-ranges", "short-pidfd", "two-pidfds"])
def test_garbled_info_records(tail):
    exc = epro(PARTS[2] + meta(FAN_PRE_ACCESS, 7, 1, tail))
    assert exc.events == EXPECTED[2:3]


def test_real_event_captured_on_6_18():
    (ev,) = parse_events(REAL_RANGE)
    assert ev == Event(4, FAN_PRE_ACCESS, 0x4233, 4096, 4096)  # pread(100 bytes at 5000): one page


def test_real_event_with_pidfd_captured_on_6_18():
    (ev,) = parse_events(REAL_PIDFD)
    assert (ev.fd, ev.pidfd, ev.offset, ev.count) == (4, 5, 4096, 4096)


def test_real_overflow_captured_on_6_18():
    ev, ovf = parse_events(REAL_OVERFLOW)
    assert ev == Event(7, FAN_PRE_ACCESS, 0x4681, 0, 4096)
    assert ovf == Event(FAN_NOFD, FAN_Q_OVERFLOW, 0) and ovf.is_overflow and not ovf.needs_response


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200) | st.lists(st.sampled_from(PARTS + [b"\x00" * 4, b"\xff" * 24])).map(b"".join))
def test_any_bytes_parse_or_raise_eproto(buf):
    try:
        events = parse_events(buf)
    except ErofsMountError as exc:
        assert exc.errno == errno.EPROTO
    else:
        assert all(isinstance(e, Event) for e in events)


# ------------------------------------------------------------------ responses

def test_allow_bytes():
    assert allow(7) == struct.pack("=iI", 7, FAN_ALLOW) == bytes.fromhex("0700000001000000")


def test_deny_bytes():
    assert deny(7) == struct.pack("=iI", 7, FAN_DENY)
    assert deny(7, errno.EIO) == bytes.fromhex("0700000002000005")  # FAN_DENY | EIO << 24


@pytest.mark.parametrize("err", sorted(wire.DENY_ERRNOS))
def test_deny_carries_each_allowed_errno(err):
    fd, resp = struct.unpack("=iI", deny(3, err))
    assert fd == 3 and resp & 0xFF == FAN_DENY and resp >> wire.FAN_ERRNO_SHIFT == err


def test_allowed_errnos_are_the_kernels():
    assert wire.DENY_ERRNOS == {errno.EIO, errno.EPERM, errno.EBUSY, errno.ETXTBSY, errno.EAGAIN,
                                errno.ENOSPC, errno.EDQUOT}


@pytest.mark.parametrize("err", [errno.ENOENT, errno.EINVAL, errno.ENODATA, errno.EUCLEAN, 300])
def test_deny_refuses_errnos_the_kernel_refuses(err):
    with pytest.raises(ValueError):
        deny(3, err)


@pytest.mark.parametrize("fd", [FAN_NOFD, -2])
def test_no_answer_without_an_event_fd(fd):
    with pytest.raises(ValueError):
        allow(fd)
    with pytest.raises(ValueError):
        deny(fd, errno.EIO)


# ------------------------------------------------------------------ flag sets

def test_init_flags():
    f = wire.init_flags()
    assert f & 0xC == wire.FAN_CLASS_PRE_CONTENT
    assert f & wire.FAN_UNLIMITED_QUEUE and f & wire.FAN_CLOEXEC and f & wire.FAN_NONBLOCK
    forbidden = (wire.FAN_REPORT_FID | wire.FAN_REPORT_DIR_FID | wire.FAN_REPORT_NAME | wire.FAN_REPORT_TARGET_FID
                 | wire.FAN_REPORT_MNT)
    assert not f & forbidden
    assert not wire.init_flags(nonblock=False) & wire.FAN_NONBLOCK
    assert wire.init_flags(report_pidfd=True) & wire.FAN_REPORT_PIDFD
    with pytest.raises(ValueError):
        wire.init_flags(report_pidfd=True, report_tid=True)


def test_event_f_flags():
    assert wire.event_f_flags() & os.O_ACCMODE == os.O_RDWR
    assert wire.event_f_flags(write=False) & os.O_ACCMODE == os.O_RDONLY
    assert wire.event_f_flags() & os.O_CLOEXEC and not wire.event_f_flags() & os.O_CREAT


def test_mark_flags():
    assert wire.mark_flags() == (wire.FAN_MARK_ADD | wire.FAN_MARK_DONT_FOLLOW, FAN_PRE_ACCESS)
    assert wire.mark_flags(remove=True) == (wire.FAN_MARK_REMOVE | wire.FAN_MARK_DONT_FOLLOW, FAN_PRE_ACCESS)


def test_wire_is_pure():
    code = "import sys, erofs_mount.backends.fanotify.wire; print(' '.join(sys.modules))"
    mods = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          check=True).stdout.split()
    assert not [m for m in mods if m.split(".")[0] in ("trio", "httpx", "pyfuse3", "pyroute2", "anyio")]


# ------------------------------------------------------------------ the real kernel

def test_parse_a_real_event_from_this_kernel(tmp_path):
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p]
    path = tmp_path / "sparse"
    path.write_bytes(b"")
    os.truncate(path, 1 << 20)
    group = libc.fanotify_init(wire.init_flags(), wire.event_f_flags())
    if group < 0:
        pytest.skip(f"no pre-content fanotify group here: {os.strerror(ctypes.get_errno())}")
    try:
        flags, mask = wire.mark_flags()
        if libc.fanotify_mark(group, flags, mask, -100, os.fsencode(path)) < 0:
            pytest.skip(f"FAN_PRE_ACCESS marks refused on {tmp_path}: {os.strerror(ctypes.get_errno())}")
        child = os.fork()
        if child == 0:  # pragma: no cover - the accessor
            signal.alarm(10)
            fd = os.open(path, os.O_RDONLY)
            os._exit(0 if os.pread(fd, 100, 5000) == bytes(100) else 1)
        try:
            assert select.select([group], [], [], 10)[0], "no event within 10 s"
            (ev,) = parse_events(os.read(group, 4096))
            assert (ev.mask, ev.pid, ev.offset, ev.count) == (FAN_PRE_ACCESS, child, 4096, 4096)
            assert ev.needs_response and ev.pidfd is None
            assert os.write(group, allow(ev.fd)) == 8
            os.close(ev.fd)
            _, status = os.waitpid(child, 0)
            child = 0
            assert os.waitstatus_to_exitcode(status) == 0
        finally:
            if child:
                os.kill(child, signal.SIGKILL)
                os.waitpid(child, 0)
    finally:
        os.close(group)
