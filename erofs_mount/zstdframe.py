"""Exact-length zstd decoding shared by the EROFS reader (zstd pclusters, erofs/decompress.py) and the
``+zstd`` OCI layer source (seekable-format frames, sources/oci/zseek.py).  Pure: no I/O.

python-zstandard's decompressors must not be used by two threads at once (the FUSE daemon and the
layer source decode in worker threads; a shared one crashed or returned wrong bytes), so each thread
keeps its own, one per window size.  The window a (damaged) frame header may ask for is bounded by
the size we expect to get out of it.
"""

from __future__ import annotations

import threading

import zstandard

from .errors import CorruptedError

_tls = threading.local()


def _decompressor(out_len: int) -> zstandard.ZstdDecompressor:
    wlog = max(20, (max(out_len, 1) - 1).bit_length())
    cache = getattr(_tls, "dctx", None)
    if cache is None:
        cache = _tls.dctx = {}
    dctx = cache.get(wlog)
    if dctx is None:
        dctx = cache[wlog] = zstandard.ZstdDecompressor(max_window_size=1 << wlog)
    return dctx


def decode_exact(src: bytes, out_len: int, *, strict: bool, what: str = "frame") -> bytes:
    """The first ``out_len`` bytes the zstd frame in ``src`` decodes to; with ``strict`` it must decode
    to exactly that many.  Never decodes more than ``out_len + 1`` bytes.  ``CorruptedError`` (EIO)
    names what went wrong ("zstd: <libzstd's error>" or "zstd: <what> decodes to N bytes, expected M")."""
    chunks = []
    got = 0
    extra = b""
    try:
        with _decompressor(out_len).stream_reader(src, read_across_frames=False) as reader:
            for _ in range(out_len + 2):   # each round makes progress or ends
                if got >= out_len:
                    break
                chunk = reader.read(out_len - got)
                if not chunk:
                    break
                chunks.append(chunk)
                got += len(chunk)
            if strict and got == out_len:
                extra = reader.read(1)
    except zstandard.ZstdError as exc:
        raise CorruptedError(f"zstd: {exc}") from None
    if got != out_len or extra:
        raise CorruptedError(f"zstd: {what} decodes to {got}{' or more' if extra else ''} bytes, expected {out_len}")
    return b"".join(chunks)
