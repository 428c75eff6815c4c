"""Without the kernel's nbd driver: one clear line suggesting `modprobe nbd` or --mode fuse."""

from __future__ import annotations

import errno

import pytest

from erofs_mount.backends.nbd import lifecycle, netlink, sysfs
from erofs_mount.backends.nbd.config import NbdOptions
from erofs_mount.errors import ErofsMountError


@pytest.fixture
def no_driver():
    if netlink.family_available() or sysfs.module_loaded():
        pytest.skip("this kernel has the nbd driver")


def test_missing_driver_is_one_line_with_the_remedy(no_driver):
    for opts in (NbdOptions(), NbdOptions(mode="netlink")):
        with pytest.raises(ErofsMountError) as info:
            lifecycle.choose_mode(opts)
        msg = str(info.value)
        assert "modprobe nbd" in msg and "--mode fuse" in msg and "\n" not in msg
        assert info.value.errno == errno.ENODEV


def test_mount_fails_before_forking(no_driver, tmp_path):
    img = tmp_path / "img"
    img.write_bytes(b"\0" * 8192)
    with pytest.raises(ErofsMountError) as info:
        lifecycle.mount(str(img), str(tmp_path), NbdOptions(log_file=str(tmp_path / "log")))
    assert "modprobe nbd" in str(info.value)
    assert not (tmp_path / "log").exists()
