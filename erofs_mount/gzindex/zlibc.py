"""PURE: the system zlib (``libz.so.1``) through ctypes, for what Python's ``zlib`` module cannot do.

Random access into a gzip stream (zlib ``examples/zran.c``, erofs-utils ``lib/gzran.c``) needs three
things the ``zlib`` module does not expose: ``inflate(Z_BLOCK)`` (stop at each deflate block boundary
and report it in ``data_type``), ``inflatePrime`` (resume at a *bit* offset) and
``inflateSetDictionary``/``inflateGetDictionary`` on a raw stream (seed/read the 32 KiB window).

``z_stream`` is declared field for field as in ``zlib.h`` (zlib 1.2.x/1.3.x; zlib-ng's compat
library keeps it): on LP64 Linux (x86_64, aarch64) ``uInt`` is 32 bits and ``uLong`` 64 bits, so
the struct is 112 bytes.  ``inflateInit2_`` is given ``zlibVersion()`` and ``sizeof(z_stream)`` and
refuses (``Z_VERSION_ERROR``) a library whose struct differs, so a layout mismatch cannot go unseen.

One ``Inflater`` is one ``z_stream``; it is not thread-safe (use one per thread).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno as _errno

from ..errors import CorruptedError, ErofsMountError, UnsupportedError

# zlib.h constants
Z_NO_FLUSH = 0
Z_SYNC_FLUSH = 2
Z_FINISH = 4
Z_BLOCK = 5
Z_OK = 0
Z_STREAM_END = 1
Z_NEED_DICT = 2
Z_ERRNO = -1
Z_STREAM_ERROR = -2
Z_DATA_ERROR = -3
Z_MEM_ERROR = -4
Z_BUF_ERROR = -5
Z_VERSION_ERROR = -6

WBITS_RAW = -15            # raw deflate, 32 KiB window
WBITS_GZIP = 31            # gzip wrapper only (16 + 15): zlib checks CRC-32 and ISIZE of each member
WINSIZE = 32768

# data_type bits after inflate() (zlib.h, "The Z_BLOCK option ..."):
DT_UNUSED_BITS = 7         # unused bits in the last byte taken from next_in (< 8 when DT_BLOCK_END)
DT_LAST_BLOCK = 64         # decoding the last block of the deflate stream
DT_BLOCK_END = 128         # just after an end-of-block code, or after the gzip/zlib header


class z_stream(ctypes.Structure):
    _fields_ = [
        ("next_in", ctypes.c_void_p),
        ("avail_in", ctypes.c_uint),
        ("total_in", ctypes.c_ulong),
        ("next_out", ctypes.c_void_p),
        ("avail_out", ctypes.c_uint),
        ("total_out", ctypes.c_ulong),
        ("msg", ctypes.c_char_p),
        ("state", ctypes.c_void_p),
        ("zalloc", ctypes.c_void_p),
        ("zfree", ctypes.c_void_p),
        ("opaque", ctypes.c_void_p),
        ("data_type", ctypes.c_int),
        ("adler", ctypes.c_ulong),
        ("reserved", ctypes.c_ulong),
    ]


_lib_cache: list = []


def libz() -> ctypes.CDLL:
    """The loaded zlib with prototypes set (cached); ``UnsupportedError`` when it cannot be loaded."""
    if _lib_cache:
        return _lib_cache[0]
    errors = []
    lib = None
    for name in ("libz.so.1", ctypes.util.find_library("z")):
        if not name:
            continue
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError as exc:
            errors.append(str(exc))
    if lib is None:
        raise UnsupportedError("gzip random access needs the system zlib (libz.so.1, Debian package zlib1g): "
                               + ("; ".join(errors) or "not found"))
    missing = [f for f in ("inflateInit2_", "inflate", "inflateEnd", "inflateReset2", "inflatePrime",
                           "inflateSetDictionary", "inflateGetDictionary", "zlibVersion") if not hasattr(lib, f)]
    if missing:
        raise UnsupportedError(f"the system zlib is too old for gzip random access (no {', '.join(missing)}; "
                               "zlib >= 1.2.7.1 needed)")
    zp = ctypes.POINTER(z_stream)
    lib.zlibVersion.restype = ctypes.c_char_p
    lib.zlibVersion.argtypes = []
    for name, args in (("inflateInit2_", [zp, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]),
                       ("inflate", [zp, ctypes.c_int]),
                       ("inflateEnd", [zp]),
                       ("inflateReset2", [zp, ctypes.c_int]),
                       ("inflatePrime", [zp, ctypes.c_int, ctypes.c_int]),
                       ("inflateSetDictionary", [zp, ctypes.c_void_p, ctypes.c_uint]),
                       ("inflateGetDictionary", [zp, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint)])):
        fn = getattr(lib, name)
        fn.argtypes = args
        fn.restype = ctypes.c_int
    _lib_cache.append(lib)
    return lib


def zlib_version() -> str:
    return libz().zlibVersion().decode()


class Inflater:
    """One ``z_stream`` and the input it reads from.

    ``in_offset`` is the absolute compressed offset of the next unconsumed input byte (the caller
    says where the first input starts); every error names it.  Output goes to caller-owned ctypes
    buffers (``inflate(buf, start, end, flush)``) so nothing is copied twice.
    """

    def __init__(self, wbits: int, *, in_offset: int = 0) -> None:
        self._lib = libz()
        self._strm = z_stream()
        self._open = False
        self._input = b""
        self._in_base = in_offset          # absolute offset of self._input[0]
        ret = self._lib.inflateInit2_(ctypes.byref(self._strm), wbits, self._lib.zlibVersion(),
                                      ctypes.sizeof(z_stream))
        if ret != Z_OK:
            raise UnsupportedError(f"zlib inflateInit2 failed ({ret}): libz {zlib_version()} does not match "
                                   f"our z_stream of {ctypes.sizeof(z_stream)} bytes")
        self._open = True

    # ---- input -------------------------------------------------------------------------------------
    @property
    def avail_in(self) -> int:
        return self._strm.avail_in

    @property
    def in_offset(self) -> int:
        return self._in_base + len(self._input) - self._strm.avail_in

    def set_input(self, data: bytes) -> None:
        """Input from ``in_offset`` on; appends to what is left unconsumed (copied only then)."""
        if not isinstance(data, bytes):
            data = bytes(data)
        pos = self.in_offset
        left = self._strm.avail_in
        if left:
            data = self._input[len(self._input) - left:] + data
        if len(data) > 0xFFFFFFFF:
            raise ValueError("inflate input is limited to 4 GiB per call (uInt avail_in)")
        self._in_base = pos
        self._input = data               # keeps the buffer zlib points into alive
        self._strm.next_in = ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value if data else None
        self._strm.avail_in = len(data)

    def peek(self) -> int | None:
        """The next unconsumed input byte, or None."""
        left = self._strm.avail_in
        return self._input[len(self._input) - left] if left else None

    def skip(self, n: int) -> int:
        """Consume up to *n* input bytes without inflating them (gzip trailers); how many were."""
        n = min(n, self._strm.avail_in)
        if n:
            self._strm.next_in += n
            self._strm.avail_in -= n
        return n

    def take(self, n: int) -> bytes:
        """Consume and return up to *n* input bytes without inflating them."""
        left = self._strm.avail_in
        start = len(self._input) - left
        got = self._input[start:start + n]
        self.skip(len(got))
        return got

    # ---- inflate -----------------------------------------------------------------------------------
    @property
    def data_type(self) -> int:
        return self._strm.data_type

    def inflate(self, buf: ctypes.Array, start: int, end: int, flush: int = Z_NO_FLUSH) -> tuple[int, int]:
        """Inflate into ``buf[start:end]``; (zlib's return code, bytes written).

        ``Z_BUF_ERROR`` (no progress possible: more input needed) is returned, not raised.  A damaged
        stream raises ``CorruptedError`` naming zlib's message and the compressed offset."""
        s = self._strm
        if not self._open:
            raise ValueError("inflate on a closed Inflater")
        room = min(end - start, 0xFFFFFFFF)
        s.next_out = ctypes.addressof(buf) + start
        s.avail_out = room
        ret = self._lib.inflate(ctypes.byref(s), flush)
        produced = room - s.avail_out
        if ret in (Z_OK, Z_STREAM_END, Z_BUF_ERROR):
            return ret, produced
        if ret in (Z_DATA_ERROR, Z_NEED_DICT):
            why = s.msg.decode(errors="replace") if s.msg else ("needs a preset dictionary" if ret == Z_NEED_DICT
                                                                 else "invalid data")
            raise CorruptedError(f"gzip: {why} at compressed offset {self.in_offset}")
        if ret == Z_MEM_ERROR:
            raise ErofsMountError("zlib: out of memory", errno=_errno.ENOMEM)
        raise ErofsMountError(f"zlib: inflate returned {ret} at compressed offset {self.in_offset}")

    def prime(self, bits: int, value: int) -> None:
        """Insert the low *bits* bits of *value* before next_in (raw streams; zran.c resumes this way)."""
        self._check(self._lib.inflatePrime(ctypes.byref(self._strm), bits, value), "inflatePrime")

    def set_dictionary(self, window: bytes) -> None:
        if window:
            self._check(self._lib.inflateSetDictionary(ctypes.byref(self._strm), window, len(window)),
                        "inflateSetDictionary")

    def get_dictionary(self) -> bytes:
        """The last <= 32 KiB of output since the last reset (zlib's own sliding window)."""
        buf = ctypes.create_string_buffer(WINSIZE)
        n = ctypes.c_uint(0)
        self._check(self._lib.inflateGetDictionary(ctypes.byref(self._strm), buf, ctypes.byref(n)),
                    "inflateGetDictionary")
        return buf.raw[:n.value]

    def reset(self, wbits: int) -> None:
        """Start a new stream (next gzip member) keeping the unconsumed input."""
        self._check(self._lib.inflateReset2(ctypes.byref(self._strm), wbits), "inflateReset2")

    def _check(self, ret: int, what: str) -> None:
        if ret != Z_OK:
            raise ErofsMountError(f"zlib: {what} returned {ret}")

    def close(self) -> None:
        if self._open:
            self._open = False
            self._lib.inflateEnd(ctypes.byref(self._strm))
        self._input = b""

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self) -> Inflater:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
