"""FUSE inode numbers <-> EROFS nids (pure).

The root is FUSE's root id (``FUSE_ROOT_ID``, 1, ``include/uapi/linux/fuse.h``); every other
nid >= 2 is its own number, as the kernel reports ``st_ino`` (so ``find -inum`` and
``check_tree.py --check-ino`` agree with a kernel mount); nids 0 and 1 (never the root's slot in
practice) map to 2^64-1 and 2^64-2.  No nid can collide with the root, numbers are stable across
remounts, and hard links (one nid) share one.

On a metabox image the kernel folds nids (the metabox flag in bit 63) into 64-bit inode numbers:
bits 31-62 move up one and the flag goes to bit 31 (``fs/erofs/internal.h``,
``erofs_nid_to_ino64``; seen as ``st_ino`` on 6.18).  The same folding is used here.
"""

from __future__ import annotations

from ...errors import StaleError

FUSE_ROOT_ID = 1
_INO_HIGH = (1 << 64) - 1    # nids 0 and 1 live at the top of the inode number space
_NID_MASK = (1 << 63) - 1    # EROFS_DIRENT_NID_MASK: bit 63 flags a nid inside the metabox


class InodeNumbers:
    def __init__(self, root_nid: int, metabox: bool) -> None:
        self.root_nid = root_nid
        self.metabox = metabox

    def ino_of(self, nid: int) -> int:
        if nid == self.root_nid:
            return FUSE_ROOT_ID
        if self.metabox:
            x = nid & _NID_MASK
            nid = ((x >> 31) << 32) | ((nid >> 63) << 31) | (x & 0x7FFFFFFF)
        return nid if nid >= 2 else _INO_HIGH - nid

    def nid_of(self, ino: int) -> int:
        if ino == FUSE_ROOT_ID:
            return self.root_nid
        if ino >= _INO_HIGH - 1:
            ino = _INO_HIGH - ino
        elif ino < 2:
            raise StaleError(f"inode number {ino} names no inode")
        if self.metabox:
            return (((ino >> 32) << 31) | (ino & 0x7FFFFFFF)) | (((ino >> 31) & 1) << 63)
        return ino
