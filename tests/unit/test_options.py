"""-o / -t parsing (pure)."""

import pytest

from erofs_mount.errors import UsageError
from erofs_mount.options import parse_options, parse_size


def test_groups_and_order():
    o = parse_options(["ro,nosuid,nodev,allow_other,fsname=demo", "oci.layer=2,oci.platform=linux/arm64",
                       "device=/a,device=/b,nbd.index=3,noatime,user_xattr,cache_limit=1G"], devices=("/z",))
    assert o.flags == ("nosuid", "nodev", "noatime")
    assert o.fuse == {"allow_other": "", "fsname": "demo"}
    assert o.oci == {"layer": "2", "platform": "linux/arm64"}
    assert o.nbd == {"index": "3"}
    assert o.devices == ("/z", "/a", "/b")
    assert o.kernel == ("user_xattr",)
    assert o.cache == {"limit": str(1 << 30)}
    assert o.is_oci and o.mode == "auto"
    assert o.uint("nbd", "index") == 3


@pytest.mark.parametrize("fstype, mode, want", [
    ("erofs.fuse", None, "fuse"), ("erofs.nbd", None, "nbd"), ("erofs", None, "auto"), (None, "fuse", "fuse"),
    ("erofs", "nbd", "nbd"), (None, None, "auto"),
])
def test_mode_selection(fstype, mode, want):
    assert parse_options([], fstype=fstype, mode=mode).mode == want


@pytest.mark.parametrize("opts, fstype, mode, message", [
    (["rw"], None, None, "read-only"),
    (["bogus"], None, None, "unknown option 'bogus'"),
    (["nosuid=1"], None, None, "unknown option 'nosuid=1'"),
    (["fsname="], None, None, "needs a value"),
    (["oci.layer=1,oci.blob=sha256:" + "0" * 64], None, None, "mutually exclusive"),
    (["oci.layer=x"], None, None, "not a number"),
    (["oci.blob=md5:00"], None, None, "sha256"),
    (["uid=-1"], None, None, "negative"),
    (["cache_limit=lots"], None, None, "not a size"),
    ([], "ext4", None, "unknown filesystem type 'ext4'"),
    ([], "erofs.fuse", "nbd", "conflicts"),
    ([], None, "loop", "unknown mode"),
])
def test_errors_name_the_problem(opts, fstype, mode, message):
    with pytest.raises(UsageError, match=message):
        parse_options(opts, fstype=fstype, mode=mode)


def test_sizes():
    assert parse_size("x", "512M") == 512 << 20
    assert parse_size("x", "4096") == 4096
    assert parse_size("x", "2GiB") == 2 << 30
