"""A read-only merged view of an OCI image's layers (later layers win), as one ``Image``-like object.

:mod:`.core` holds the pure rules (whiteouts, opaque directories, merging one directory's listings,
the inode numbering, the merged superblock); :mod:`.image` the ``MergedImage`` facade the FUSE
operations and the tools use in place of ``erofs.image.Image``.
"""

from .core import MAX_LAYERS, decode_nid, encode_nid, merge_dir, whiteout_target
from .image import MergedImage, merged_paths

__all__ = ["MAX_LAYERS", "MergedImage", "decode_nid", "encode_nid", "merge_dir", "merged_paths",
           "whiteout_target"]
