"""What the FUSE operations say about an inode: its attributes and the permission check of ACCESS (pure)."""

from __future__ import annotations

import errno
import os
import stat

import pyfuse3

TIMEOUT = 86400.0          # the image never changes: cache names and attributes for a day


def entry_attributes(inode, ino: int, block_size: int, uid: int | None = None,
                     gid: int | None = None) -> pyfuse3.EntryAttributes:
    """Attributes of ``inode`` (an ``erofs.inode`` record) as FUSE inode number ``ino``; ``uid``/``gid``
    replace the owner when given (the ``uid=``/``gid=`` options)."""
    a = pyfuse3.EntryAttributes()
    a.st_ino = ino
    a.generation = 0
    a.entry_timeout = TIMEOUT
    a.attr_timeout = TIMEOUT
    a.st_mode = inode.mode
    a.st_nlink = inode.nlink
    a.st_uid = inode.uid if uid is None else uid
    a.st_gid = inode.gid if gid is None else gid
    a.st_rdev = inode.rdev
    a.st_size = inode.size
    a.st_blksize = block_size
    a.st_blocks = inode.blocks
    # erofs keeps one timestamp; the kernel reports it as atime, mtime and ctime
    ns = inode.mtime * 1_000_000_000 + inode.mtime_nsec
    a.st_atime_ns = ns
    a.st_mtime_ns = ns
    a.st_ctime_ns = ns
    return a


def access_error(mode: int, owner: int, group: int, want: int, uid: int, gid: int,
                 groups=lambda: ()) -> int:
    """0 if a caller (``uid``, ``gid``, supplementary ``groups()``) may access an inode (``mode``,
    ``owner``, ``group``) as ``want`` (``os.R_OK|W_OK|X_OK``), else the errno.  The classic
    owner/group/other check of the kernel's ``generic_permission``: root passes, except execute,
    which needs one x bit on a non-directory; nothing is writable (EROFS)."""
    if uid == 0:
        if want & os.X_OK and not stat.S_ISDIR(mode) and not mode & 0o111:
            return errno.EACCES
        return 0
    if uid == owner:
        bits = (mode >> 6) & 7
    elif gid == group or group in groups():
        bits = (mode >> 3) & 7
    else:
        bits = mode & 7
    if want & os.W_OK:
        return errno.EROFS
    if (want & 7) & ~bits:
        return errno.EACCES
    return 0
