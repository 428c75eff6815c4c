"""Codec table keyed by the on-disk algorithm id: compressed pcluster bytes -> decoded bytes.

Pure and bounded: every decoder is told the exact number of output bytes wanted
(``out_len``, the extent length from the indexes) and never produces more than that
(plus one probe byte in strict mode), so a hostile pcluster cannot make us allocate
beyond the extent.  Failures raise ``CorruptedError``; ``zdata`` adds the nid and
logical offset.

Ids (``erofs_fs.h`` ``Z_EROFS_COMPRESSION_*``; the two "runtime" ids after them are the
kernel's ``compress.h`` transforms for uncompressed pclusters):

  0 LZ4 (``lz4.block``), 1 LZMA = MicroLZMA (stdlib ``lzma``, raw LZMA1), 2 DEFLATE (raw:
  libdeflate through the ``deflate`` package when a pcluster holds one whole stream, stdlib
  ``zlib`` otherwise), 3 ZSTD (``zstandard``), 4 SHIFTED, 5 INTERLACED.

``strict`` is the kernel's "full decoding": the pcluster must decode to exactly
``out_len`` bytes.  Otherwise ("partial decoding", kernel ``rq->partial_decoding``:
a PARTIAL_REF extent, the EOF extent, or LZ4 without 0-padding) the pcluster may hold
more and only the first ``out_len`` bytes are returned.
"""

from __future__ import annotations

import lzma
import zlib

import lz4.block
from deflate import DeflateError, deflate_decompress    # libdeflate: 2.2-2.7x zlib on 4-64 KiB pclusters

from ..errors import CorruptedError, UnsupportedError
from ..zstdframe import decode_exact

Z_EROFS_COMPRESSION_LZ4 = 0
Z_EROFS_COMPRESSION_LZMA = 1
Z_EROFS_COMPRESSION_DEFLATE = 2
Z_EROFS_COMPRESSION_ZSTD = 3
Z_EROFS_COMPRESSION_MAX = 4
Z_EROFS_COMPRESSION_SHIFTED = 4      # compress.h: Z_EROFS_COMPRESSION_MAX
Z_EROFS_COMPRESSION_INTERLACED = 5
Z_EROFS_COMPRESSION_RUNTIME_MAX = 6
Z_EROFS_ALL_COMPR_ALGS = (1 << Z_EROFS_COMPRESSION_MAX) - 1

Z_EROFS_PCLUSTER_MAX_SIZE = 1024 * 1024         # encoded
Z_EROFS_PCLUSTER_MAX_DSIZE = 12 * 1024 * 1024   # decoded
Z_EROFS_LZMA_MAX_DICT_SIZE = 8 * Z_EROFS_PCLUSTER_MAX_SIZE
Z_EROFS_ZSTD_MAX_DICT_SIZE = Z_EROFS_PCLUSTER_MAX_SIZE

ALGORITHM_NAMES = {
    Z_EROFS_COMPRESSION_LZ4: "lz4",
    Z_EROFS_COMPRESSION_LZMA: "lzma",
    Z_EROFS_COMPRESSION_DEFLATE: "deflate",
    Z_EROFS_COMPRESSION_ZSTD: "zstd",
    Z_EROFS_COMPRESSION_SHIFTED: "shifted",
    Z_EROFS_COMPRESSION_INTERLACED: "interlaced",
}


def algorithm_name(alg: int) -> str:
    return ALGORITHM_NAMES.get(alg, f"unknown algorithm {alg}")


def strip_zero_padding(src: bytes) -> bytes:
    """Drop the leading zeros of a right-aligned pcluster (kernel ``z_erofs_fixup_insize``)."""
    n = len(src)
    stripped = src.lstrip(b"\0")
    if not stripped:
        raise CorruptedError(f"pcluster of {n} bytes is all zero padding")
    return stripped


# ---------------------------------------------------------------------------- LZ4

def lz4_decode_partial(src: bytes, out_len: int) -> bytes:
    """Decode the first ``out_len`` bytes of an LZ4 block (like ``LZ4_decompress_safe_partial``).

    Pure Python; used only when the C decoder cannot express the request (a block that
    holds more than we want, or trailing garbage after it on images without 0-padding).
    The output never grows past ``out_len``.
    """
    out = bytearray()
    i, n = 0, len(src)
    while len(out) < out_len:
        if i >= n:
            raise CorruptedError(f"lz4: input ends after {len(out)} of {out_len} bytes")
        token = src[i]
        i += 1
        lit = token >> 4
        if lit == 15:
            while True:
                if i >= n:
                    raise CorruptedError("lz4: truncated literal length")
                b = src[i]
                i += 1
                lit += b
                if b != 255:
                    break
        if i + lit > n:
            if len(out) + (n - i) >= out_len:   # the wanted bytes are all there
                lit = n - i
            else:
                raise CorruptedError("lz4: literal run past the end of the input")
        out += src[i:i + lit]
        i += lit
        if len(out) >= out_len:
            break
        if i + 2 > n:
            raise CorruptedError("lz4: truncated match offset")
        off = src[i] | (src[i + 1] << 8)
        i += 2
        if off == 0 or off > len(out):
            raise CorruptedError(f"lz4: match offset {off} outside the {len(out)} decoded bytes")
        ml = token & 15
        if ml == 15:
            while True:
                if i >= n:
                    raise CorruptedError("lz4: truncated match length")
                b = src[i]
                i += 1
                ml += b
                if b != 255:
                    break
        ml = min(ml + 4, out_len - len(out))
        start = len(out) - off
        if off >= ml:
            out += out[start:start + ml]
        else:  # overlapping copy: the last `off` bytes repeat
            pat = bytes(out[start:])
            out += (pat * (ml // off + 1))[:ml]
    return bytes(out[:out_len])


def decompress_lz4(src: bytes, out_len: int, strict: bool, zero_padding: bool) -> bytes:
    """``decompress`` for an LZ4 pcluster, without the dispatch (``out_len`` within the limits)."""
    if zero_padding:
        src = strip_zero_padding(src)
    try:
        out = lz4.block.decompress(src, uncompressed_size=out_len)
    except lz4.block.LZ4BlockError:
        out = None
    if out is not None and len(out) == out_len:
        return out
    if out is None and not strict:
        # partial decoding (a PARTIAL_REF extent: the pcluster holds more than we want): the C
        # decoder with a bounded larger buffer gives the same prefix much faster than the
        # Python one; a block beyond the bound (or with trailing garbage) still goes there
        try:
            out = lz4.block.decompress(src, uncompressed_size=min(Z_EROFS_PCLUSTER_MAX_DSIZE, 4 * out_len + 65536))
        except lz4.block.LZ4BlockError:
            out = None
        if out is not None and len(out) >= out_len:
            return out[:out_len]
    # Without 0-padding the kernel always decodes partially: the block may be followed
    # by zeros (decompressor.c "legacy format could compress extra data in a pcluster").
    if strict and zero_padding:
        got = "undecodable" if out is None else f"{len(out)} bytes"
        raise CorruptedError(f"lz4: pcluster decodes to {got}, expected {out_len}")
    return lz4_decode_partial(src, out_len)


# ---------------------------------------------------------------------------- MicroLZMA

def _lzma(src: bytes, out_len: int, strict: bool, dict_size: int) -> bytes:
    # MicroLZMA (xz-embedded xz_dec_microlzma): the first byte is the bitwise NOT of the
    # LZMA properties byte and stands in for the range coder's first byte, always 0.
    src = strip_zero_padding(src)
    props = ~src[0] & 0xFF
    if props >= 9 * 5 * 5:
        raise CorruptedError(f"lzma: invalid properties byte 0x{props:02x}")
    lc, rest = props % 9, props // 9
    lp, pb = rest % 5, rest // 5
    if lc + lp > 4:
        raise CorruptedError(f"lzma: unsupported lc={lc} lp={lp}")
    # a match never reaches before the pcluster's first decoded byte, so a dictionary of the
    # output size suffices whatever the image's dict_size (and allocates no more than that)
    dsz = max(4096, min(dict_size or out_len, out_len))
    try:
        dec = lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=[{
            "id": lzma.FILTER_LZMA1, "dict_size": dsz, "lc": lc, "lp": lp, "pb": pb}])
        out = dec.decompress(b"\0" + src[1:], max_length=out_len)
    except lzma.LZMAError as exc:
        raise CorruptedError(f"lzma: {exc}") from None
    if len(out) != out_len:
        raise CorruptedError(f"lzma: pcluster decodes to {len(out)} bytes, expected {out_len}")
    return out


# ---------------------------------------------------------------------------- DEFLATE

def _deflate(src: bytes, out_len: int, strict: bool) -> bytes:
    src = strip_zero_padding(src)
    # libdeflate decodes whole streams only: one that ends at exactly out_len bytes is what zlib
    # gives too (strict or not).  A longer one (partial decoding), a shorter or a broken one fails
    # there, and zlib decodes it or names the problem.
    try:
        out = deflate_decompress(src, out_len)
    except DeflateError:
        return _deflate_zlib(src, out_len, strict)
    if len(out) != out_len:
        return _deflate_zlib(src, out_len, strict)
    return bytes(out)   # a bytearray; callers may keep and hash what they get


def _deflate_zlib(src: bytes, out_len: int, strict: bool) -> bytes:
    try:
        dec = zlib.decompressobj(-15)
        out = dec.decompress(src, out_len)
        extra = b""
        if strict and len(out) == out_len and not dec.eof:
            extra = dec.decompress(dec.unconsumed_tail, 1)
    except zlib.error as exc:
        raise CorruptedError(f"deflate: {exc}") from None
    if len(out) != out_len or extra:
        more = " or more" if extra else ""
        raise CorruptedError(f"deflate: pcluster decodes to {len(out)}{more} bytes, expected {out_len}")
    return out


# ---------------------------------------------------------------------------- ZSTD

def _zstd(src: bytes, out_len: int, strict: bool) -> bytes:
    return decode_exact(strip_zero_padding(src), out_len, strict=strict, what="pcluster")


# ---------------------------------------------------------------------------- uncompressed

def transform_plain(src: bytes, out_len: int, interlaced: bool, la: int, block_size: int) -> bytes:
    """An uncompressed pcluster (kernel ``z_erofs_transform_plain``).

    SHIFTED: the extent's bytes start at the pcluster start.  INTERLACED: the first
    ``block_size - la % block_size`` bytes sit at the *end* of the pcluster (at the same
    in-block offset as their logical position) and the rest at its start.
    """
    if out_len > len(src):
        raise CorruptedError(f"uncompressed pcluster of {len(src)} bytes for a {out_len}-byte extent")
    if not interlaced:
        return src[:out_len]
    cur = block_size - (la & (block_size - 1))
    first = min(cur, out_len)
    start = len(src) - cur
    if start < 0:
        raise CorruptedError("interlaced pcluster shorter than its head part")
    return src[start:start + first] + src[:out_len - first]


# ---------------------------------------------------------------------------- table

def decompress(alg: int, src: bytes, out_len: int, *, strict: bool, zero_padding: bool = True,
               la: int = 0, block_size: int = 4096, lzma_dict_size: int = 0) -> bytes:
    """Decode ``src`` (the whole pcluster) with algorithm ``alg`` into exactly ``out_len`` bytes."""
    if out_len < 0 or out_len > Z_EROFS_PCLUSTER_MAX_DSIZE:
        raise UnsupportedError(f"decoded extent of {out_len} bytes exceeds the 12 MiB limit")
    if out_len == 0:
        return b""
    if alg == Z_EROFS_COMPRESSION_LZ4:
        return decompress_lz4(src, out_len, strict, zero_padding)
    if alg == Z_EROFS_COMPRESSION_LZMA:
        return _lzma(src, out_len, strict, lzma_dict_size)
    if alg == Z_EROFS_COMPRESSION_DEFLATE:
        return _deflate(src, out_len, strict)
    if alg == Z_EROFS_COMPRESSION_ZSTD:
        return _zstd(src, out_len, strict)
    if alg in (Z_EROFS_COMPRESSION_SHIFTED, Z_EROFS_COMPRESSION_INTERLACED):
        return transform_plain(src, out_len, alg == Z_EROFS_COMPRESSION_INTERLACED, la, block_size)
    raise UnsupportedError(f"unknown compression algorithm {alg}")
