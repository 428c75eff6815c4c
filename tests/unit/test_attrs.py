"""ACCESS's permission check and the attributes the FUSE operations report (backends/fuse/attrs.py)."""

import errno
import os
import stat
from types import SimpleNamespace

import pytest

pytest.importorskip("pyfuse3")
from erofs_mount.backends.fuse.attrs import TIMEOUT, access_error, entry_attributes  # noqa: E402

R, W, X = os.R_OK, os.W_OK, os.X_OK
FILE = stat.S_IFREG | 0o640
DIR = stat.S_IFDIR | 0o750


@pytest.mark.parametrize("mode, uid, gid, groups, want, err", [
    (FILE, 10, 99, (), R | W, errno.EROFS),        # owner may write the file, the image may not
    (FILE, 10, 99, (), R, 0),                       # owner bits rw-
    (FILE, 10, 99, (), X, errno.EACCES),
    (FILE, 11, 20, (), R, 0),                       # group bits r--
    (FILE, 11, 21, (20,), R, 0),                    # ... through a supplementary group
    (FILE, 11, 21, (), R, errno.EACCES),            # other bits ---
    (FILE, 0, 0, (), R | W, 0),                     # root reads and passes W (the VFS answers EROFS first)
    (FILE, 0, 0, (), X, errno.EACCES),              # root executes only with an x bit somewhere
    (stat.S_IFREG | 0o001, 0, 0, (), X, 0),
    (DIR, 0, 0, (), X, 0),                          # root searches any directory
    (DIR, 11, 20, (), X, 0),
    (DIR, 11, 21, (), X, errno.EACCES),
    (FILE, 11, 21, (), 0, 0),                       # F_OK
])
def test_access_is_the_owner_group_other_check(mode, uid, gid, groups, want, err):
    assert access_error(mode, 10, 20, want, uid, gid, lambda: groups) == err


def test_groups_are_asked_only_when_needed():
    def never():
        raise AssertionError("supplementary groups read for the owner")
    assert access_error(FILE, 10, 20, R, 10, 5, never) == 0


def test_entry_attributes():
    inode = SimpleNamespace(mode=FILE, nlink=3, uid=10, gid=20, rdev=0, size=5000, blocks=16,
                            mtime=1_700_000_000, mtime_nsec=123)
    a = entry_attributes(inode, 77, 4096)
    assert (a.st_ino, a.st_mode, a.st_nlink, a.st_uid, a.st_gid, a.st_size, a.st_blksize, a.st_blocks) == (
        77, FILE, 3, 10, 20, 5000, 4096, 16)
    assert a.st_mtime_ns == a.st_atime_ns == a.st_ctime_ns == 1_700_000_000_000_000_123
    assert a.entry_timeout == a.attr_timeout == TIMEOUT
    b = entry_attributes(inode, 77, 4096, uid=1, gid=2)
    assert (b.st_uid, b.st_gid) == (1, 2)
