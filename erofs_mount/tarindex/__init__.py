"""Tar index: an EROFS metadata image whose regular files' data is the uncompressed tar after it.

Pure (no I/O): :mod:`.tarparse` turns the tar stream into members (sans-I/O), :mod:`.tree`
builds the layer's file tree from them, :mod:`.writer` serialises the tree as the index.  The
device to mount is ``index + tar``.
"""

from .tarparse import END, NEED_DATA, Member, TarParser, members_of, normalize
from .tree import Node, Tree, build_tree
from .writer import build_index, index_tar

__all__ = ["END", "NEED_DATA", "Member", "TarParser", "members_of", "normalize", "Node", "Tree", "build_tree",
           "build_index", "index_tar"]
