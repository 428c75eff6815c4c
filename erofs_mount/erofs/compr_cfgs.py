"""Compression configuration of an image (kernel ``z_erofs_parse_cfgs`` and the per-algorithm
``z_erofs_load_*_config``).

Without ``COMPR_CFGS`` only LZ4 exists and the superblock ``u1`` field is its
``lz4_max_distance``.  With it, ``u1`` is the ``available_compr_algs`` bitmap and one
variable-sized record per set bit follows the superblock: 4-byte aligned, a le16 length
(0 means 65536, as ``erofs_read_metadata``), then ``z_erofs_{lz4,lzma,deflate,zstd}_cfgs``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import CorruptedError, UnsupportedError
from . import decompress as D

EROFS_SUPER_OFFSET = 1024
INCOMPAT_LZ4_0PADDING = 0x1
INCOMPAT_COMPR_CFGS = 0x2

_LZ4_CFGS = struct.Struct("<HH10s")     # max_distance, max_pclusterblks
_LZMA_CFGS = struct.Struct("<IH8s")     # dict_size, format
_DEFLATE_CFGS = struct.Struct("<B5s")   # windowbits
_ZSTD_CFGS = struct.Struct("<BB4s")     # format, windowlog - 10


@dataclass(frozen=True, slots=True)
class ComprCfgs:
    available_compr_algs: int       # bitmap of Z_EROFS_COMPRESSION_* ids
    zero_padding: bool              # INCOMPAT_LZ4_0PADDING
    lz4_max_distance: int = 0
    lz4_max_pclusterblks: int = 1
    lzma_dict_size: int = 0
    deflate_windowbits: int = 0
    zstd_windowlog: int = 0         # already + 10

    def names(self) -> list[str]:
        return [D.algorithm_name(a) for a in range(D.Z_EROFS_COMPRESSION_MAX) if self.available_compr_algs >> a & 1]


def parse_compr_cfgs(feature_incompat: int, u1: int, sb_size: int, blkszbits: int,
                     read_raw: Callable[[int, int], bytes]) -> ComprCfgs:
    """Parse the configuration; ``read_raw(pos, n)`` reads the primary device."""
    zero_padding = bool(feature_incompat & INCOMPAT_LZ4_0PADDING)
    if not feature_incompat & INCOMPAT_COMPR_CFGS:
        return ComprCfgs(available_compr_algs=1 << D.Z_EROFS_COMPRESSION_LZ4, zero_padding=zero_padding,
                         lz4_max_distance=u1)
    algs = u1
    unknown = algs & ~D.Z_EROFS_ALL_COMPR_ALGS
    if unknown:
        ids = [i for i in range(16) if unknown >> i & 1]
        raise UnsupportedError("unknown compression algorithm id(s) " + ", ".join(map(str, ids))
                               + f" in available_compr_algs 0x{algs:x}")
    fields: dict = {}
    pos = EROFS_SUPER_OFFSET + sb_size
    for alg in range(D.Z_EROFS_COMPRESSION_MAX):
        if not algs >> alg & 1:
            continue
        pos = (pos + 3) & ~3
        head = read_raw(pos, 2)
        if len(head) != 2:
            raise CorruptedError(f"compression config of {D.algorithm_name(alg)} past the end of the image")
        size = int.from_bytes(head, "little") or 65536
        data = read_raw(pos + 2, size)
        if len(data) != size:
            raise CorruptedError(f"compression config of {D.algorithm_name(alg)} past the end of the image")
        pos += 2 + size
        fields.update(_load(alg, data, blkszbits))
    return ComprCfgs(available_compr_algs=algs, zero_padding=zero_padding, **fields)


def _load(alg: int, data: bytes, blkszbits: int) -> dict:
    name = D.algorithm_name(alg)
    if alg == D.Z_EROFS_COMPRESSION_LZ4:
        if len(data) < _LZ4_CFGS.size:
            raise CorruptedError(f"invalid lz4 cfgs, size={len(data)}")
        dist, pblks, _ = _LZ4_CFGS.unpack_from(data)
        if pblks > (D.Z_EROFS_PCLUSTER_MAX_SIZE >> blkszbits):
            raise CorruptedError(f"too large lz4 pclusterblks {pblks}")
        return {"lz4_max_distance": dist, "lz4_max_pclusterblks": pblks or 1}
    if alg == D.Z_EROFS_COMPRESSION_LZMA:
        if len(data) < _LZMA_CFGS.size:
            raise CorruptedError(f"invalid lzma cfgs, size={len(data)}")
        dict_size, fmt, _ = _LZMA_CFGS.unpack_from(data)
        if fmt:
            raise UnsupportedError(f"unidentified lzma format {fmt:#x}")
        if not 4096 <= dict_size <= D.Z_EROFS_LZMA_MAX_DICT_SIZE:
            raise CorruptedError(f"unsupported lzma dictionary size {dict_size}")
        return {"lzma_dict_size": dict_size}
    if alg == D.Z_EROFS_COMPRESSION_DEFLATE:
        if len(data) < _DEFLATE_CFGS.size:
            raise CorruptedError(f"invalid deflate cfgs, size={len(data)}")
        wbits, _ = _DEFLATE_CFGS.unpack_from(data)
        if wbits > 15:
            raise UnsupportedError(f"unsupported deflate windowbits {wbits}")
        return {"deflate_windowbits": wbits}
    if alg == D.Z_EROFS_COMPRESSION_ZSTD:
        if len(data) < _ZSTD_CFGS.size:
            raise CorruptedError(f"invalid zstd cfgs, size={len(data)}")
        fmt, wlog, _ = _ZSTD_CFGS.unpack_from(data)
        if fmt:
            raise UnsupportedError(f"unidentified zstd format {fmt:#x}")
        if (1 << (wlog + 10)) > D.Z_EROFS_ZSTD_MAX_DICT_SIZE:
            raise UnsupportedError(f"unsupported zstd window log {wlog + 10}")
        return {"zstd_windowlog": wlog + 10}
    raise UnsupportedError(f"unknown compression algorithm {name}")  # pragma: no cover
