"""NBD options (pure): -o nbd.* values, mount flags → MS_* bits, rw refused."""

from __future__ import annotations

import errno

import pytest

from erofs_mount.backends.nbd import config
from erofs_mount.backends.nbd.config import NbdOptions, apply_nbd_option, nbd_options_from, split_mount_options
from erofs_mount.errors import ErofsMountError


def test_defaults():
    o = NbdOptions()
    assert o.index is None and o.dead_conn_timeout == 30 * 24 * 3600 and o.mode == "auto"
    assert o.mount_flags == config.MS_RDONLY


def test_mount_flags_and_data():
    flags, data = split_mount_options(["nosuid", "nodev", "noexec", "noatime", "acl", "cache_strategy=readaround"])
    assert flags == config.MS_RDONLY | config.MS_NOSUID | config.MS_NODEV | config.MS_NOEXEC | config.MS_NOATIME
    assert data == "acl,cache_strategy=readaround"
    flags, _ = split_mount_options(["noexec", "exec", "ro", "defaults"])
    assert flags == config.MS_RDONLY


def test_rw_is_refused():
    with pytest.raises(ErofsMountError) as info:
        split_mount_options(["rw"])
    assert info.value.errno == errno.EROFS


@pytest.mark.parametrize("key,value,field,expected", [
    ("index", "3", "index", 3),
    ("dead_conn_timeout", "0", "dead_conn_timeout", 0),
    ("io_timeout", "2", "io_timeout", 2),
    ("read_ahead_kb", "0", "read_ahead_kb", 0),
    ("block_size", "512", "block_size", 512),
    ("mode", "ioctl", "mode", "ioctl"),
    ("zero_copy", "pread", "zero_copy", "pread"),
])
def test_nbd_options(key, value, field, expected):
    assert getattr(apply_nbd_option(NbdOptions(), key, value), field) == expected


@pytest.mark.parametrize("key,value", [
    ("index", "-1"), ("index", "x"), ("block_size", "1000"), ("block_size", "8192"), ("mode", "fast"),
    ("zero_copy", "yes"), ("nope", "1"),
])
def test_bad_nbd_options(key, value):
    with pytest.raises(ErofsMountError):
        apply_nbd_option(NbdOptions(), key, value)


def test_from_option_list():
    o = nbd_options_from(["nbd.index=2", "nosuid", "user_xattr"])
    assert o.index == 2 and o.mount_flags & config.MS_NOSUID and o.mount_data == "user_xattr"
