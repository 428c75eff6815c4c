"""Random access into tar+gzip (and, for frame boundaries, tar+zstd) OCI layers.

Built once while the layer streams through (the caller parses the tar from the same output), then used
to serve any uncompressed range by inflating from the nearest checkpoint: zlib ``examples/zran.c``,
stored as AWS SOCI's zinfo v2 exactly as erofs-utils ``lib/gzran.c`` (``mkfs.erofs --tar=i --gzinfo``)
writes it.  The system zlib is driven through ctypes (``zlibc``): Python's ``zlib`` module has no
``Z_BLOCK``/``inflatePrime``.  Pure: no I/O, no trio.
"""

from .index import (DEFAULT_SPAN, Checkpoint, GzIndex, GzIndexBuilder, RangeInflater, from_zinfo, read_range,
                    to_sidecar, to_zinfo)

__all__ = ["DEFAULT_SPAN", "Checkpoint", "GzIndex", "GzIndexBuilder", "RangeInflater", "from_zinfo", "read_range",
           "to_sidecar", "to_zinfo"]
