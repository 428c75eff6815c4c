"""The sans-I/O tar parser: every header kind in GNU, PAX, USTAR and v7, any chunking, and hostile input."""

from __future__ import annotations

import base64
import io
import random
import tarfile

import pytest

from erofs_mount.errors import CorruptedError, UnsupportedError
from erofs_mount.tarindex.tarparse import END, NEED_DATA, TarParser, members_of, normalize, parse_number

MTIME = 1_700_000_000
KIND = {tarfile.REGTYPE: "reg", tarfile.AREGTYPE: "reg", tarfile.DIRTYPE: "dir", tarfile.SYMTYPE: "symlink",
        tarfile.LNKTYPE: "hardlink", tarfile.CHRTYPE: "chr", tarfile.BLKTYPE: "blk", tarfile.FIFOTYPE: "fifo"}


def make_tar(entries, fmt=tarfile.PAX_FORMAT, pax_headers=None) -> bytes:
    """``entries``: (TarInfo, data or None)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, pax_headers=pax_headers or {}) as tf:
        for ti, data in entries:
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def info(name, type_=tarfile.REGTYPE, data=b"", **kw):
    ti = tarfile.TarInfo(name)
    ti.type = type_
    ti.mtime = kw.pop("mtime", MTIME)
    ti.mode = kw.pop("mode", 0o644)
    ti.uname, ti.gname = kw.pop("uname", "user"), kw.pop("gname", "group")
    for k, v in kw.items():
        setattr(ti, k, v)
    if type_ in (tarfile.REGTYPE, tarfile.AREGTYPE):
        ti.size = len(data)
        return ti, data
    return ti, None


def every_kind(long=False, ustar=False):
    base = "d" * 120 + "/" if long else ""
    if ustar and long:   # ustar link names are at most 100 bytes
        return [info(base + "dir", tarfile.DIRTYPE, mode=0o2755), info(base + "dir/file", data=b"x" * 700, mode=0o4755),
                info(base + "dir/sym", tarfile.SYMTYPE, linkname="../t"), info("hard", tarfile.LNKTYPE, linkname="x")]
    return [
        info(base + "dir", tarfile.DIRTYPE, mode=0o2755),
        info(base + "dir/file", data=b"x" * 700, mode=0o4755, uid=1000, gid=1001),
        info(base + "dir/empty"),
        info(base + "dir/sym", tarfile.SYMTYPE, linkname="../" + "t" * (150 if long else 10), mode=0o777),
        info(base + "dir/hard", tarfile.LNKTYPE, linkname=base + "dir/file"),
        info(base + "dir/chr", tarfile.CHRTYPE, devmajor=4, devminor=64),
        info(base + "dir/blk", tarfile.BLKTYPE, devmajor=8, devminor=1),
        info(base + "dir/fifo", tarfile.FIFOTYPE, mode=0o1644),
        info(base + "dir/tail", data=b"y" * 512),
    ]


def check_against_tarfile(data: bytes, members):
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        want = tf.getmembers()
    assert len(members) == len(want)
    for m, ti in zip(members, want):
        assert m.path == normalize(ti.name)
        assert m.kind == KIND[ti.type]
        assert m.mode == ti.mode & 0o7777
        assert (m.uid, m.gid, m.uname, m.gname) == (ti.uid, ti.gid, ti.uname, ti.gname)
        assert m.mtime_ns == int(ti.mtime) * 1_000_000_000
        assert m.size == (ti.size if ti.isreg() else 0)
        assert m.header_offset == ti.offset and m.data_offset == ti.offset_data
        assert m.data_offset % 512 == 0
        if ti.issym():
            assert m.linkname == ti.linkname
        elif ti.islnk():
            assert m.linkname == normalize(ti.linkname)
        if ti.ischr() or ti.isblk():
            assert (m.devmajor, m.devminor) == (ti.devmajor, ti.devminor)


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
@pytest.mark.parametrize("long", [False, True])
def test_every_kind_matches_tarfile(fmt, long):
    data = make_tar(every_kind(long, fmt == tarfile.USTAR_FORMAT), fmt)
    members = members_of(data)
    check_against_tarfile(data, members)
    by = {m.path: m for m in members}
    f = by[("d" * 120 + "/" if long else "") + "dir/file"]
    assert data[f.data_offset:f.data_offset + 700] == b"x" * 700
    assert f.mode == 0o4755


def _feed(data: bytes, sizes) -> list:
    p = TarParser()
    out, pos = [], 0
    for n in sizes:
        p.feed(data[pos:pos + n])
        pos += n
        out.extend(p.events())
    p.feed(data[pos:])
    p.close()
    out.extend(p.events())
    return out


def test_chunking_whole_one_byte_random():
    data = make_tar(every_kind(True) + every_kind(False), tarfile.PAX_FORMAT)
    whole = members_of(data)
    assert _feed(data, [1] * len(data)) == whole
    rng = random.Random(1234)
    for _ in range(20):
        sizes = []
        while sum(sizes) < len(data):
            sizes.append(rng.choice([1, 2, 7, 511, 512, 513, 1000, 4096]))
        assert _feed(data, sizes) == whole
    p = TarParser()
    p.feed(memoryview(bytearray(data)))
    p.close()
    assert list(p.events()) == whole


def test_next_event_and_data_not_buffered():
    big = bytes(range(256)) * 20000   # 5 MB of data
    data = make_tar([info("a", data=big), info("b", data=b"z")])
    p = TarParser()
    assert p.next_event() is NEED_DATA
    p.feed(data[:512])
    m = p.next_event()
    assert m.path == "a" and m.size == len(big)
    assert p.next_event() is NEED_DATA
    for i in range(512, 512 + len(big), 65536):
        p.feed(data[i:i + 65536])
        assert len(p._buf) <= 512   # data is counted and skipped, never held
    p.feed(data[512 + len(big):])
    assert p.next_event().path == "b"
    assert p.next_event() is END  # end marker seen
    p.close()
    assert p.end_marker and p.next_event() is END


def test_trailing_bytes_after_end_marker_ignored():
    data = make_tar([info("a", data=b"1")])
    p = TarParser()
    p.feed(data + b"garbage that is not a tar header" * 40)
    p.close()
    assert [m.path for m in p.events()] == ["a"] and p.trailing > 0


def test_eof_at_boundary_and_lone_zero_block():
    data = make_tar([info("a", data=b"1")])
    body = data[:1024]   # header + data block
    assert [m.path for m in members_of(body)] == ["a"]
    assert [m.path for m in members_of(body + bytes(512))] == ["a"]
    hdr = make_tar([info("b")])[:512]
    with pytest.raises(CorruptedError, match=r"lone zero block at offset 1024 .* offset 1536"):
        members_of(body + bytes(512) + hdr)


def raw_header(name=b"f", flag=b"0", size=0, *, mode=0o644, uid=0, gid=0, mtime=MTIME, linkname=b"",
               magic=b"ustar\x00", version=b"00", prefix=b"", signed=False, numbers=None) -> bytes:
    h = bytearray(512)
    h[0:len(name)] = name
    fields = {"mode": (100, 8, mode), "uid": (108, 8, uid), "gid": (116, 8, gid), "size": (124, 12, size),
              "mtime": (136, 12, mtime)}
    for key, (off, width, val) in fields.items():
        raw = (numbers or {}).get(key)
        h[off:off + width] = raw if raw is not None else b"%0*o\0" % (width - 1, val)
    h[156:157] = flag
    h[157:157 + len(linkname)] = linkname
    h[257:263], h[263:265] = magic, version
    h[345:345 + len(prefix)] = prefix
    h[148:156] = b" " * 8
    s = sum(b - 256 if signed and b >= 128 else b for b in h)
    h[148:156] = b"%06o\0 " % (s & 0o777777)
    return bytes(h)


def rec(key: bytes, value: bytes) -> bytes:
    """One PAX record: its length counts its own digits."""
    body = b" %s=%s\n" % (key, value)
    n = len(body)
    while len(str(n)) + len(body) != n:
        n = len(str(n)) + len(body)
    return b"%d%s" % (n, body)


def pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % 512)


def test_checksum_mismatch_and_signed_sum():
    data = bytearray(make_tar([info("a", data=b"1"), info("b", data=b"2")]))
    data[1024 + 10] ^= 1   # second header
    with pytest.raises(CorruptedError, match=r"bad header checksum at offset 1024"):
        members_of(bytes(data))
    name = "é".encode() + b"\xff"
    for signed in (False, True):
        ms = members_of(raw_header(name, signed=signed) + bytes(1024))
        assert ms[0].path.encode("utf-8", "surrogateescape") == name


def test_truncation_messages():
    data = make_tar([info("a", data=b"1" * 100), info("big", data=b"2" * 2000)])
    big = members_of(data)[1]
    assert big.data_offset == 1536
    with pytest.raises(CorruptedError, match=r"member 'big' claims 2000 bytes but the stream ends at offset 2536"):
        members_of(data[:big.data_offset + 1000])
    with pytest.raises(CorruptedError, match=r"member 'big' claims 2000 bytes .* offset 3536"):
        members_of(data[:big.data_offset + 2000])   # inside the padding
    with pytest.raises(CorruptedError, match=r"ends inside a header at offset 1024 \(100 of 512"):
        members_of(data[:1124])
    pax = make_tar([info("p" * 200, data=b"")], tarfile.PAX_FORMAT)
    with pytest.raises(CorruptedError, match=r"pax header at offset 0 claims \d+ bytes but the stream ends"):
        members_of(pax[:600])
    with pytest.raises(CorruptedError, match=r"extension header at offset 0 is not followed by a member"):
        members_of(pax[:1024])


def test_bounds():
    huge = make_tar([info("a", data=b"")], tarfile.PAX_FORMAT)
    value = "v" * (1 << 20)
    ti, _ = info("a")
    ti.pax_headers = {"SCHILY.xattr.user.big": value}
    data = make_tar([(ti, b"")])
    p = TarParser()
    with pytest.raises(CorruptedError, match=r"pax header of \d+ bytes exceeds the 1048576-byte limit at offset 0"):
        p.feed(data[:512])   # refused from its header: nothing buffered first
    assert members_of(huge)[0].path == "a"
    longname = make_tar([info("n/" * 2100, tarfile.DIRTYPE)], tarfile.GNU_FORMAT)
    with pytest.raises(CorruptedError, match=r"longname header of 4201 bytes exceeds the 4097-byte limit"):
        members_of(longname)
    ti, _ = info("x")
    ti.pax_headers = {"path": "q" * 5000}
    with pytest.raises(CorruptedError, match=r"path of 5000 bytes exceeds 4096"):
        members_of(make_tar([(ti, b"")]))
    assert members_of(make_tar([info("n/" * 2000, tarfile.DIRTYPE)], tarfile.GNU_FORMAT))[0].path == "n/" * 1999 + "n"
    many = b"".join(raw_header(b"g", b"g", size=len(r)) + pad(r)
                    for i in range(3) for r in [rec(b"SCHILY.xattr.user.k%d" % i, b"v" * 400_000)])
    with pytest.raises(CorruptedError, match=r"global PAX records add up to more than 1048576 bytes at offset"):
        members_of(many + raw_header(b"f") + bytes(1024))


@pytest.mark.parametrize("name,want", [
    ("..", ""), ("/abs/x", "abs/x"), ("./x", "x"), ("a//b", "a/b"), ("../../etc/passwd", "etc/passwd"),
    ("./", ""), (".", ""), ("a/./b/../c/", "a/c"), ("a/../../b", "b"), ("//x//..//y/.", "y"), ("...", "..."),
])
def test_hostile_names(name, want):
    assert normalize(name) == want
    data = make_tar([info(name, tarfile.DIRTYPE), info("z", tarfile.LNKTYPE, linkname=name)], tarfile.PAX_FORMAT)
    d, h = members_of(data)
    assert d.path == want and h.linkname == want


def test_symlink_target_kept_raw():
    data = make_tar([info("s", tarfile.SYMTYPE, linkname="../../etc//passwd")])
    assert members_of(data)[0].linkname == "../../etc//passwd"


def test_base256_numbers():
    assert parse_number(b"\x80" + bytes(6) + b"\x01") == 1
    assert parse_number(b"\xff" * 8) == -1
    assert parse_number(b"\xff" * 11 + b"\xfe") == -2
    assert parse_number(b" 0000644 \0") == 0o644 and parse_number(b"\0" * 8) == 0
    with pytest.raises(ValueError):
        parse_number(b"0009\0")
    data = make_tar([info("u", data=b"1", uid=3_000_000, gid=2 ** 31, mtime=-1_000_000)], tarfile.GNU_FORMAT)
    assert data[108] & 0x80 and data[136] == 0xFF   # tarfile used base-256
    m = members_of(data)[0]
    assert (m.uid, m.gid, m.mtime_ns) == (3_000_000, 2 ** 31, -1_000_000 * 10 ** 9)
    # a 16 GiB size in base-256: the event arrives with the header, the data is only counted
    hdr = raw_header(b"huge", numbers={"size": b"\x80" + (16 << 30).to_bytes(11, "big")}, magic=b"ustar ",
                     version=b" \0")
    p = TarParser()
    p.feed(hdr)
    assert p.next_event().size == 16 << 30


def test_pax_fields_xattrs_and_globals():
    ti, data = info("orig", data=b"abc")
    ti.pax_headers = {
        "path": "pax/path", "mtime": "1700000000.123456789", "uid": "70000", "gid": "80000", "uname": "ü",
        "SCHILY.xattr.user.a": "1", "SCHILY.xattr.security.selinux": "system_u:object_r:bin_t:s0",
        "SCHILY.xattr.trusted.bin": "\udcff\udc80x",   # tarfile writes these bytes with hdrcharset=BINARY
        "LIBARCHIVE.xattr.user.%41b%3d": base64.b64encode(b"\x00\x01\x02").decode().rstrip("="),
        "SCHILY.xattr.user.empty": "",
    }
    neg, _ = info("neg", tarfile.DIRTYPE)
    neg.pax_headers = {"mtime": "-1.5", "gname": ""}
    data = make_tar([(ti, data), (neg, None)], tarfile.PAX_FORMAT,
                    pax_headers={"gname": "globalgroup", "SCHILY.xattr.user.g": "G"})
    a, n = members_of(data)
    assert (a.path, a.mtime_ns, a.uid, a.gid, a.uname, a.gname) == (
        "pax/path", 1_700_000_000_123_456_789, 70000, 80000, "ü", "globalgroup")
    assert a.xattrs == {b"user.g": b"G", b"user.a": b"1", b"security.selinux": b"system_u:object_r:bin_t:s0",
                        b"trusted.bin": b"\xff\x80x", b"user.Ab=": b"\x00\x01\x02", b"user.empty": b""}
    assert n.mtime_ns == -1_500_000_000
    assert n.gname == "group"   # an empty local value unsets the global one: the header field counts
    assert data[a.data_offset:a.data_offset + 3] == b"abc"


def test_pax_errors():
    ti, _ = info("x")
    ti.pax_headers = {"mtime": "12.3.4"}
    with pytest.raises(CorruptedError, match=r"member 'x': invalid PAX mtime"):
        members_of(make_tar([(ti, b"")]))
    bad = raw_header(b"././@PaxHeader", b"x", size=9) + pad(b"99 a=b\n\0\0")
    with pytest.raises(CorruptedError, match=r"malformed PAX header .* at offset 0"):
        members_of(bad + raw_header(b"f") + bytes(1024))
    r = rec(b"LIBARCHIVE.xattr.user.a", b"!")
    b64 = raw_header(b"h", b"x", size=len(r)) + pad(r)
    with pytest.raises(CorruptedError, match=r"member 'f': invalid base64"):
        members_of(b64 + raw_header(b"f") + bytes(1024))


def test_sparse_and_unknown_types_refused():
    with pytest.raises(UnsupportedError, match=r"member 's': sparse member not supported"):
        members_of(raw_header(b"s", b"S", magic=b"ustar ", version=b" \0") + bytes(1024))
    r = rec(b"GNU.sparse.major", b"1")
    with pytest.raises(UnsupportedError, match=r"sparse member not supported"):
        members_of(raw_header(b"p", b"x", size=len(r)) + pad(r) + raw_header(b"f") + bytes(1024))
    with pytest.raises(UnsupportedError, match=r"member 'q': unsupported type flag b'Q' at offset 0"):
        members_of(raw_header(b"q", b"Q") + bytes(1024))


def test_v7_and_ustar_prefix():
    v7 = (raw_header(b"olddir/", b"\0", magic=bytes(6), version=bytes(2))
          + raw_header(b"olddir/f", b"\0", size=3, magic=bytes(6), version=bytes(2)) + pad(b"abc")
          + raw_header(b"olddir/l", b"1", linkname=b"olddir/f", magic=bytes(6), version=bytes(2))
          + bytes(1024))
    d, f, link = members_of(v7)
    assert (d.path, d.kind, f.kind, f.size, link.kind, link.linkname) == (
        "olddir", "dir", "reg", 3, "hardlink", "olddir/f")
    assert d.uname == "" and f.data_offset == 1024
    ustar = raw_header(b"name", prefix=b"some/prefix") + bytes(1024)
    assert members_of(ustar)[0].path == "some/prefix/name"
    gnu = raw_header(b"name", prefix=b"\x01\x02junk", magic=b"ustar ", version=b" \0") + bytes(1024)
    assert members_of(gnu)[0].path == "name"   # GNU headers have no prefix field (atime/ctime there)


def test_header_only_types_ignore_size():
    # a symlink with a size field: Go's archive/tar and Python's tarfile read no data for it
    data = raw_header(b"s", b"2", size=1000, linkname=b"t") + raw_header(b"f", size=1) + pad(b"x") + bytes(1024)
    s, f = members_of(data)
    assert s.size == 0 and f.header_offset == 512 and f.data_offset == 1024


def test_volume_label_skipped_and_feed_after_close():
    data = raw_header(b"label", b"V", size=10) + pad(b"0123456789") + raw_header(b"f") + bytes(1024)
    assert [m.path for m in members_of(data)] == ["f"]
    p = TarParser()
    p.close()
    with pytest.raises(RuntimeError):
        p.feed(b"x")


def test_package_is_pure():
    import subprocess
    import sys
    code = "import sys, erofs_mount.tarindex; print(' '.join(sys.modules))"
    mods = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout.split()
    assert "erofs_mount.tarindex.writer" in mods
    assert not [m for m in mods if m.split(".")[0] in ("trio", "httpx", "pyfuse3", "pyroute2", "anyio")]
    assert not [m for m in mods if m.startswith(("erofs_mount.sources", "erofs_mount.backends"))]


def test_mutated_streams_fail_cleanly():
    """Seeded mutations (checksums fixed up, so the damage gets past the header check): only our errors escape."""
    from erofs_mount.errors import ErofsMountError
    from erofs_mount.tarindex import build_index, build_tree
    rng = random.Random(99)
    bases = [make_tar(every_kind(True) + every_kind(False), f) for f in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT)]
    outcomes = set()
    for _ in range(400):
        b = bytearray(rng.choice(bases))
        for _ in range(rng.randint(1, 3)):
            blk = rng.randrange(len(b) // 512) * 512
            b[blk + rng.randrange(512)] = rng.randrange(256)
            h = b[blk:blk + 512]
            h[148:156] = b" " * 8
            b[blk + 148:blk + 156] = b"%06o\0 " % sum(h)
        if rng.random() < 0.2:
            b = b[:rng.randrange(len(b))]
        try:
            build_index(build_tree(members_of(bytes(b))), len(b))
            outcomes.add("ok")
        except ErofsMountError as exc:
            assert str(exc).startswith("tar:"), exc
            outcomes.add(type(exc).__name__)
    assert {"ok", "CorruptedError"} <= outcomes
