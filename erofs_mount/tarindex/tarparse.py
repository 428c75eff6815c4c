"""A sans-I/O streaming tar parser: bytes in, :class:`Member` events out.

Feed the uncompressed tar stream in order with :meth:`TarParser.feed` (any chunking, one byte
at a time included) and :meth:`TarParser.close` at its end; take the members from
:meth:`TarParser.next_event` (a :class:`Member`, ``NEED_DATA`` or ``END``) or
:meth:`TarParser.events`.  File data is never buffered: the parser counts and skips it and
reports where it lies (``Member.data_offset``, always a multiple of 512).  Only headers, PAX
extended headers (at most ``max_pax`` bytes, 1 MiB) and GNU long name/link records (at most
``max_name`` bytes, 4096: PATH_MAX) are buffered.

Formats: v7, ustar (``prefix``; the star variant's shorter prefix), GNU (``L``/``K`` long
names, base-256 numbers), PAX (``x`` per member, ``g`` global, also Solaris ``X``; keys
path, linkpath, size, uid, gid, mtime with a fraction, uname, gname, SCHILY.devmajor/devminor,
``SCHILY.xattr.NAME`` = raw value and ``LIBARCHIVE.xattr.NAME`` = URL-encoded name with a
base64 value, as libarchive's archive_write_set_format_pax.c writes them; an empty value
unsets a key, except for xattrs, where it is an empty value).  Global records apply to every
later member as POSIX says (Go's archive/tar, and so containerd, returns them and ignores
them).  Rules taken from Go's archive/tar reader.go, which containerd uses to unpack layers:
numeric fields are trimmed of spaces and NULs, base-256 when the first byte has bit 7 set;
the checksum may be the unsigned or the signed byte sum; links, symlinks, devices, fifos and
directories never carry data whatever their size field says (``isHeaderOnlyType``); a typeflag
NUL with a trailing ``/`` is a directory (v7); a zero block followed by EOF, or EOF right at
a header boundary, ends the archive cleanly, and a zero block followed by a non-zero block is
an error.  Bytes after the end marker are ignored.  Unsupported, with a clear error: GNU
sparse members (``S``, PAX ``GNU.sparse.*``), multi-volume (``M``), old long names (``N``) and
unknown typeflags (containerd refuses them too; POSIX would read them as regular files).
A GNU volume label (``V``) is skipped.

Name normalisation, the rule containerd's archive/tar.go applies (``filepath.Clean``, then
resolved inside the root so ``..`` never climbs above it): split at ``/``; drop empty and
``.`` components (a leading ``/``, ``./`` and ``//`` vanish); ``..`` removes the previous
component and does nothing at the root; join the rest with ``/``.  The empty result is the
root directory itself (a ``./`` member sets the root's attributes).  Hard-link targets are
normalised the same way; symlink targets are kept as written.  Paths are ``str`` decoded as
UTF-8 with ``surrogateescape``, so ``path.encode("utf-8", "surrogateescape")`` gives the bytes
back exactly.

Errors: :class:`~erofs_mount.errors.CorruptedError` for a malformed stream,
:class:`~erofs_mount.errors.UnsupportedError` for the unsupported kinds above; messages start
with ``tar:`` and name the member (when known) and the byte offset.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import unquote_to_bytes

from ..errors import CorruptedError, UnsupportedError

BLOCK = 512
MAX_NAME = 4096      # bytes in a path or link name (Linux PATH_MAX)
MAX_PAX = 1 << 20    # bytes in one PAX extended header
_ZERO = bytes(BLOCK)
_HIGH = bytes(range(128, 256))
_KINDS = {b"0": "reg", b"\0": "reg", b"7": "reg", b"1": "hardlink", b"2": "symlink", b"3": "chr",
          b"4": "blk", b"5": "dir", b"6": "fifo", b"D": "dir"}
_HEADER_ONLY = {b"1", b"2", b"3", b"4", b"5", b"6"}   # Go archive/tar isHeaderOnlyType
_EXT = {b"x": "pax", b"X": "pax", b"g": "global", b"L": "longname", b"K": "longlink"}
_MTIME_RE = re.compile(rb"(-?)(\d{1,20})(?:\.(\d{1,30}))?")


class _Sentinel:
    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


NEED_DATA = _Sentinel("NEED_DATA")   # next_event(): feed more bytes
END = _Sentinel("END")               # next_event(): the archive ended and every member was taken


@dataclass(frozen=True, slots=True)
class Member:
    path: str                 # normalised; "" is the root directory
    kind: str                 # reg, dir, symlink, hardlink, chr, blk, fifo
    mode: int                 # permission bits, suid/sgid/sticky included
    uid: int
    gid: int
    mtime_ns: int
    size: int                 # data bytes in the stream (0 for header-only kinds)
    linkname: str             # hard links: normalised target; symlinks: target as written
    devmajor: int
    devminor: int
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    header_offset: int = 0    # first header block of the member (extension headers included)
    data_offset: int = 0      # its data in the stream (512-aligned)
    uname: str = ""
    gname: str = ""


def normalize(name: str) -> str:
    """The member path containerd would extract to, relative to the root ("" = the root)."""
    out: list[str] = []
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if out:
                out.pop()
        else:
            out.append(part)
    return "/".join(out)


def _cstr(b) -> bytes:
    b = bytes(b)
    z = b.find(b"\0")
    return b if z < 0 else b[:z]


def _text(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


def parse_number(field_: bytes) -> int:
    """A numeric header field: octal text, or GNU base-256 when bit 7 of the first byte is set."""
    if field_ and field_[0] & 0x80:
        val = int.from_bytes(bytes([field_[0] & 0x7F]) + field_[1:], "big")
        if field_[0] & 0x40:   # negative: two's complement over the field's remaining bits
            val -= 1 << (8 * len(field_) - 1)
        return val
    text = field_.strip(b" \0")
    if not text:
        return 0
    if text.strip(b"01234567"):
        raise ValueError(f"not octal: {text!r}")
    return int(text, 8)


def _parse_pax(data: bytes) -> list[tuple[str, bytes]]:
    """``"%d %s=%s\\n"`` records; trailing NUL padding is tolerated."""
    out = []
    pos = 0
    while pos < len(data) and data[pos] != 0:
        sp = data.find(b" ", pos, pos + 12)
        digits = data[pos:sp] if sp > pos else b""
        if not digits.isdigit():
            raise ValueError(f"bad record length at byte {pos}")
        end = pos + int(digits)
        if end <= sp + 1 or end > len(data) or data[end - 1] != 0x0A:
            raise ValueError(f"bad record at byte {pos}")
        key, eq, value = data[sp + 1:end - 1].partition(b"=")
        if not eq or not key:
            raise ValueError(f"record without a key at byte {pos}")
        out.append((_text(key), value))
        pos = end
    return out


class TarParser:
    """The streaming parser (see the module docstring)."""

    def __init__(self, *, max_pax: int = MAX_PAX, max_name: int = MAX_NAME) -> None:
        self.max_pax = max_pax
        self.max_name = max_name
        self.offset = 0             # stream bytes consumed so far
        self.end_marker = False     # the archive ended with zero block(s), not at a bare EOF
        self.trailing = 0           # bytes after the end marker (ignored)
        self.closed = False
        self._done = False
        self._buf = bytearray()     # the header or extension record being collected
        self._want = BLOCK
        self._skip = 0              # data + padding bytes still to skip
        self._ext: tuple[str, int, int] | None = None   # (kind, header offset, size) being collected
        self._what: tuple[str, object, int] = ("", 0, 0)  # what is being collected/skipped: kind, name, size
        self._events: deque[Member] = deque()
        self._global: dict[str, bytes] = {}
        self._global_x: dict[str, bytes] = {}
        self._local: dict[str, bytes | None] = {}
        self._local_x: list[tuple[str, bytes]] = []
        self._longname: bytes | None = None
        self._longlink: bytes | None = None
        self._start: int | None = None   # header_offset of the member whose extension headers came
        self._zero_at: int | None = None

    # ------------------------------------------------------------------ the sans-I/O surface
    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self.closed:
            raise RuntimeError("TarParser.feed() after close()")
        mv = memoryview(data).cast("B")
        i, n = 0, len(mv)
        while i < n:
            if self._done:
                self.trailing += n - i
                self.offset += n - i
                return
            if self._skip:
                k = min(self._skip, n - i)
                self._skip -= k
                i += k
                self.offset += k
                continue
            k = min(self._want - len(self._buf), n - i)
            self._buf += mv[i:i + k]
            i += k
            self.offset += k
            if len(self._buf) == self._want:
                self._complete()

    def close(self) -> None:
        """End of stream: raise if it ends inside a header, an extension record or a member's data."""
        if self.closed:
            return
        self.closed = True
        if self._done:
            return
        if self._skip or self._ext is not None:
            kind, name, size = self._what
            what = f"member {name!r}" if kind == "member" else f"{kind} at offset {name}"
            raise CorruptedError(f"tar: {what} claims {size} bytes but the stream ends at offset {self.offset}")
        if self._buf:
            raise CorruptedError(f"tar: the stream ends inside a header at offset {self.offset - len(self._buf)} "
                                 f"({len(self._buf)} of 512 bytes)")
        if self._start is not None:
            raise CorruptedError(f"tar: extension header at offset {self._start} is not followed by a member")
        self._done = True

    def next_event(self) -> Member | _Sentinel:
        if self._events:
            return self._events.popleft()
        return END if self._done else NEED_DATA

    def events(self) -> Iterator[Member]:
        """The members parsed so far and not yet taken."""
        while self._events:
            yield self._events.popleft()

    # ------------------------------------------------------------------ internals
    def _complete(self) -> None:
        buf = bytes(self._buf)
        self._buf.clear()
        self._want = BLOCK
        if self._ext is None:
            self._header(buf, self.offset - BLOCK)
            return
        kind, hoff, size = self._ext
        self._ext = None
        self._extension(kind, hoff, buf)
        self._skip = -size % BLOCK

    def _fail(self, what: str, off: int, path: str | None = None) -> CorruptedError:
        who = f"member {path!r}: " if path else ""
        return CorruptedError(f"tar: {who}{what} at offset {off}")

    def _header(self, blk: bytes, off: int) -> None:
        if blk == _ZERO:
            if self._start is not None:
                raise self._fail("end of archive right after an extension header", off)
            if self._zero_at is not None:
                self._done = self.end_marker = True
            else:
                self._zero_at = off
            return
        if self._zero_at is not None:
            raise self._fail(f"a lone zero block at offset {self._zero_at} is followed by a header", off)
        try:
            stored = parse_number(blk[148:156])
        except ValueError:
            stored = -1
        unsigned = sum(blk) - sum(blk[148:156]) + 8 * 32
        high = BLOCK - len(blk.translate(None, _HIGH)) - (8 - len(blk[148:156].translate(None, _HIGH)))
        if stored not in (unsigned, unsigned - 256 * high):
            raise self._fail("bad header checksum", off)
        flag = blk[156:157]
        name = _cstr(blk[0:100])
        magic, version = blk[257:263], blk[263:265]
        ustar = magic == b"ustar\0"
        gnu = magic == b"ustar " and version == b" \0"
        if ustar:
            prefix = _cstr(blk[345:476] if blk[508:512] == b"tar\0" else blk[345:500])
            if prefix:
                name = prefix + b"/" + name
        where = _text(self._local.get("path") or (self._longname if self._longname is not None else name))
        try:
            size = parse_number(blk[124:136])
        except ValueError:
            raise self._fail("invalid size field", off, where) from None
        if size < 0:
            raise self._fail(f"negative size {size}", off, where)
        if self._start is None and flag not in (b"g", b"V"):   # those two stand alone
            self._start = off
        if flag in _EXT:
            kind = _EXT[flag]
            limit = self.max_pax if kind in ("pax", "global") else self.max_name + 1
            if size > limit:
                raise self._fail(f"{kind} header of {size} bytes exceeds the {limit}-byte limit", off)
            self._ext = (kind, off, size)
            self._what = (kind + " header", off, size)
            if size:
                self._want = size
            else:
                self._ext = None
                self._extension(kind, off, b"")
            return
        if flag == b"S":
            raise UnsupportedError(f"tar: member {where!r}: sparse member not supported (offset {off})")
        if flag == b"V":   # GNU volume label: not a file
            self._what = ("volume label", off, size)
            self._skip = size + (-size % BLOCK)
            return
        if flag not in _KINDS:
            raise UnsupportedError(f"tar: member {where!r}: unsupported type flag {flag!r} at offset {off}")
        self._member(blk, off, flag, name, ustar or gnu)

    def _extension(self, kind: str, off: int, data: bytes) -> None:
        if kind in ("longname", "longlink"):
            value = _cstr(data)
            if len(value) > self.max_name:
                raise self._fail(f"{kind} of {len(value)} bytes exceeds {self.max_name}", off)
            setattr(self, "_" + kind, value)
            return
        try:
            records = _parse_pax(data)
        except ValueError as exc:
            raise self._fail(f"malformed PAX header ({exc})", off) from None
        for key, value in records:
            if key.startswith("GNU.sparse."):
                path = _text(dict(records).get("path", b"")) or None
                raise UnsupportedError(f"tar: member {path!r}: sparse member not supported (PAX {key} at "
                                       f"offset {off})")
            xattr = key.startswith(("SCHILY.xattr.", "LIBARCHIVE.xattr."))
            if kind == "global" and xattr:
                self._global_x[key] = value
            elif kind == "global":
                if value:
                    self._global[key] = value
                else:
                    self._global.pop(key, None)
            elif xattr:
                self._local_x.append((key, value))
            else:
                self._local[key] = value or None
        for which, recs in (("global", [*self._global.items(), *self._global_x.items()]),
                            ("pax", [*self._local.items(), *self._local_x])):
            if sum(len(k) + len(v or b"") for k, v in recs) > self.max_pax:   # repeated headers add up
                raise self._fail(f"{which} PAX records add up to more than {self.max_pax} bytes", off)

    def _num(self, pax: dict, key: str, blk: bytes, lo: int, hi: int, off: int, where: str) -> int:
        v = pax.get(key)
        if v is not None:
            if not v.isdigit() or len(v) > 30:
                raise self._fail(f"invalid PAX {key} {v[:40]!r}", off, where)
            return int(v)
        try:
            v = parse_number(blk[lo:hi])
        except ValueError:
            raise self._fail(f"invalid {key} field", off, where) from None
        if v < 0:
            raise self._fail(f"negative {key} {v}", off, where)
        return v

    def _xattrs(self, off: int, where: str) -> dict[bytes, bytes]:
        out: dict[bytes, bytes] = {}
        for key, value in [*self._global_x.items(), *self._local_x]:
            if key.startswith("SCHILY."):
                out[key[13:].encode("utf-8", "surrogateescape")] = value
                continue
            try:
                v = value.strip()
                out[unquote_to_bytes(key[17:].encode("utf-8", "surrogateescape"))] = base64.b64decode(
                    v + b"=" * (-len(v) % 4), validate=True)
            except (binascii.Error, ValueError):
                raise self._fail(f"invalid base64 in PAX {key}", off, where) from None
        return out

    def _member(self, blk: bytes, off: int, flag: bytes, name: bytes, ext_fields: bool) -> None:
        pax = self._global
        if self._local:
            pax = dict(pax)
            for k, v in self._local.items():
                if v is None:
                    pax.pop(k, None)
                else:
                    pax[k] = v
        raw_path = pax.get("path", self._longname if self._longname is not None else name)
        raw_link = pax.get("linkpath", self._longlink if self._longlink is not None else _cstr(blk[157:257]))
        where = _text(raw_path)
        for what, raw in (("path", raw_path), ("link name", raw_link)):
            if len(raw) > self.max_name:
                raise self._fail(f"{what} of {len(raw)} bytes exceeds {self.max_name}", off, where[:200])
            if b"\0" in raw:
                raise self._fail(f"NUL byte in the {what}", off, where)
        kind = "dir" if flag == b"\0" and raw_path.endswith(b"/") else _KINDS[flag]
        size = 0 if flag in _HEADER_ONLY else self._num(pax, "size", blk, 124, 136, off, where)
        uid, gid = self._num(pax, "uid", blk, 108, 116, off, where), self._num(pax, "gid", blk, 116, 124, off, where)
        try:
            mode = parse_number(blk[100:108]) & 0o7777
            mtime_ns = parse_number(blk[136:148]) * 1_000_000_000
        except ValueError:
            raise self._fail("invalid mode or mtime field", off, where) from None
        if "mtime" in pax:
            m = _MTIME_RE.fullmatch(pax["mtime"])
            if m is None:
                raise self._fail(f"invalid PAX mtime {pax['mtime'][:40]!r}", off, where)
            mtime_ns = int(m[2]) * 1_000_000_000 + int((m[3] or b"0")[:9].ljust(9, b"0"))
            mtime_ns = -mtime_ns if m[1] else mtime_ns
        devmajor = devminor = 0
        if kind in ("chr", "blk") and (ext_fields or "SCHILY.devmajor" in pax):
            devmajor = self._num(pax, "SCHILY.devmajor", blk, 329, 337, off, where)
            devminor = self._num(pax, "SCHILY.devminor", blk, 337, 345, off, where)
        uname = pax.get("uname", _cstr(blk[265:297]) if ext_fields else b"")
        gname = pax.get("gname", _cstr(blk[297:329]) if ext_fields else b"")
        linkname = _text(raw_link) if kind in ("symlink", "hardlink") else ""
        if kind == "hardlink":
            linkname = normalize(linkname)
        xattrs = self._xattrs(off, where) if self._global_x or self._local_x else {}
        self._events.append(Member(
            path=normalize(where), kind=kind, mode=mode, uid=uid, gid=gid, mtime_ns=mtime_ns, size=size,
            linkname=linkname, devmajor=devmajor, devminor=devminor, xattrs=xattrs,
            header_offset=self._start if self._start is not None else off, data_offset=off + BLOCK,
            uname=_text(uname), gname=_text(gname)))
        self._local, self._local_x = {}, []
        self._longname = self._longlink = None
        self._start = None
        self._what = ("member", where, size)
        self._skip = size + (-size % BLOCK)


def members_of(data, *, chunk: int = 1 << 20) -> list[Member]:
    """Every member of a whole tar stream in memory (a convenience for tests and tools)."""
    p = TarParser()
    mv = memoryview(data)
    out: list[Member] = []
    for i in range(0, len(mv), chunk):
        p.feed(mv[i:i + chunk])
        out.extend(p.events())
    p.close()
    out.extend(p.events())
    return out
