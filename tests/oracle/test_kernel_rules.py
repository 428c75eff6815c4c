"""The kernel's rules the differential fuzz taught the reader, pinned down without a kernel.

Each rule was found as a disagreement between our reader and Linux 6.18 on a damaged image
(tests/oracle/test_mutants.py re-checks them against the kernel where one is available).
"""

from __future__ import annotations

import errno
import struct

import pytest

from erofs_mount.erofs import layout as L
from erofs_mount.erofs.inode import parse_inode
from erofs_mount.erofs.superblock import parse_superblock
from erofs_mount.erofs.xattr import capability_value, posix_acl_value, xxh32
from erofs_mount.errors import CorruptedError, UnsupportedError


def test_xxh32_known_vectors():
    assert xxh32(b"", 0) == 0x02CC5D05
    assert xxh32(b"abc", 0) == 0x32D153FF
    assert xxh32(b"Nobody inspects the spammish repetition", 0) == 0xE2293B2F


def test_capability_v2_v3_and_invalid_headers():
    body = bytes(range(16))
    v2 = struct.pack("<I", 0x02000001) + body
    assert capability_value(v2, "t") == v2
    # only the effective flag is masked off before the revision compare (commoncap.c sansflags)
    with pytest.raises(CorruptedError) as exc:
        capability_value(struct.pack("<I", 0x020000FF) + body, "t")
    assert exc.value.errno == errno.EINVAL
    with pytest.raises(CorruptedError):
        capability_value(v2 + b"\0", "t")
    v3_root0 = struct.pack("<I", 0x03000001) + body + struct.pack("<I", 0)
    assert capability_value(v3_root0, "t") == struct.pack("<I", 0x02000001) + body
    v3 = struct.pack("<I", 0x03000000) + body + struct.pack("<I", 1000)
    assert capability_value(v3, "t") == v3
    with pytest.raises(CorruptedError) as exc:
        capability_value(struct.pack("<I", 0x03000000) + body + b"\xff" * 4, "t")
    assert exc.value.errno == errno.EOVERFLOW


def test_posix_acl_reencoded_like_the_kernel():
    entries = [(0x01, 6, 123), (0x02, 7, 1234), (0x04, 4, 5), (0x10, 7, 9), (0x20, 4, 0)]
    raw = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)
    want = struct.pack("<I", 2) + b"".join(
        struct.pack("<HHI", t, p, i if t in (0x02, 0x08) else 0xFFFFFFFF) for t, p, i in entries)
    assert posix_acl_value(raw, "t") == want
    assert posix_acl_value(struct.pack("<I", 2), "t") is None          # no entries: ENODATA
    with pytest.raises(UnsupportedError):
        posix_acl_value(struct.pack("<I", 1) + raw[4:], "t")            # version: EOPNOTSUPP
    for bad in (raw[:-1], struct.pack("<I", 2) + struct.pack("<HHI", 0x40, 0, 0),
                struct.pack("<I", 2) + struct.pack("<HHI", 0x02, 7, 0xFFFFFFFF)):
        with pytest.raises(CorruptedError) as exc:
            posix_acl_value(bad, "t")
        assert exc.value.errno == errno.EINVAL


def _sb():
    head = bytearray(4096)
    struct.pack_into("<IIIBB", head, 1024, L.EROFS_SUPER_MAGIC_V1, 0, 0, 12, 0)
    return parse_superblock(bytes(head))


def test_negative_i_size_is_corruption():
    sb = _sb()
    ext = bytearray(64)
    struct.pack_into("<HHHHQ", ext, 0, 1, 0, 0o100644, 0, 1 << 63)   # extended, flat plain
    with pytest.raises(CorruptedError):
        parse_inode(sb, 40, bytes(ext))
    struct.pack_into("<Q", ext, 8, (1 << 63) - 1)
    assert parse_inode(sb, 40, bytes(ext)).size == (1 << 63) - 1


def test_iloc_wraps_like_erofs_off_t():
    from erofs_mount.erofs.inode import iloc
    sb = _sb()
    assert iloc(sb, (1 << 60) + 5) == (5 * 32, False)


def test_user_xattrs_of_special_files_read_as_absent(tmp_path):
    """fs/xattr.c xattr_permission: user.* on a non-regular, non-directory inode is ENODATA (names still listed)."""
    import gzip
    from pathlib import Path

    from erofs_mount.erofs.image import Image
    from erofs_mount.errors import NoDataError
    from tests.oracle import kmount

    base = Path(__file__).resolve().parents[1] / "data" / "oracle" / "mutants" / "plain-4k.erofs.gz"
    data = bytearray(gzip.open(base).read())
    img = Image(lambda o, n: bytes(data[o:o + n]), size=len(data))
    nid = img.resolve("/xattrs/shared-1")
    ino = img.inode(nid)
    struct.pack_into("<H", data, ino.iloc + 4, 0o140644)   # i_mode: a socket now
    img = Image(lambda o, n: bytes(data[o:o + n]), size=len(data))
    assert b"user.shared" in img.listxattr(nid)
    with pytest.raises(NoDataError):
        img.getxattr(nid, b"user.shared")
    assert img.getxattr(nid, b"trusted.shared") == b"T" * 10
    if not kmount.kernel_unavailable_reason():
        import os
        image = tmp_path / "sock.erofs"
        image.write_bytes(bytes(data))
        with kmount.kernel_mount(image, tmp_path / "mnt") as mnt:
            p = os.path.join(mnt, "xattrs", "shared-1")
            assert "user.shared" in os.listxattr(p, follow_symlinks=False)
            with pytest.raises(OSError) as exc:
                os.getxattr(p, "user.shared", follow_symlinks=False)
            assert exc.value.errno == errno.ENODATA
