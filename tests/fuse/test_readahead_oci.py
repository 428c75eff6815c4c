"""The read-ahead of a FUSE mount of an uncompressed registry layer (root): 1 MiB READs while blob bytes
are still to be fetched (cold: big READs, fewer round trips), the kernel's 128 KiB once the
persistent cache holds the whole blob (warm: READs answered inline from the page cache)."""

from __future__ import annotations

import os

import pytest

from erofs_mount.backends.fuse.accel.readahead import bdi_setting
from erofs_mount.sources.diskcache import DiskCache
from tests.oci.conftest import world  # noqa: F401 - the session's real registry (skips without docker-registry)

from tests.conftest import run_cli as cli

from .conftest import wait_for


def _window(mnt: str) -> int:
    with open(bdi_setting(os.stat(mnt).st_dev)) as f:
        return int(f.read())


def test_cold_registry_mounts_read_big_until_the_blob_is_local(world, fuse, tmp_path):  # noqa: F811
    if os.geteuid() != 0:
        pytest.skip("read_ahead_kb is root's to set")
    cache = tmp_path / "cache"
    mnt = fuse.mountpoint("cold")
    res = cli("--mode", "fuse", "-o", f"oci.layer=0,oci.insecure,oci.cache={cache}", world.ref("team/app:v1"), mnt,
              timeout=120)
    assert res.returncode == 0, res.stderr.decode()
    assert _window(mnt) == 1024
    # another process completes the blob's cache entry: the mount goes back to the kernel's window
    blob = world.blobs["A"]
    dc = DiskCache.open(str(cache), world.digests["A"], len(blob))
    try:
        dc.write(0, blob)
    finally:
        dc.close()
    assert wait_for(lambda: _window(mnt) == 128, timeout=10)
    assert cli("-u", mnt).returncode == 0
    # warm from the start: the kernel's window, never raised
    mnt = fuse.mountpoint("warm")
    res = cli("--mode", "fuse", "-o", f"oci.layer=0,oci.insecure,oci.cache={cache}", world.ref("team/app:v1"), mnt,
              timeout=120)
    assert res.returncode == 0, res.stderr.decode()
    assert _window(mnt) == 128
    assert cli("-u", mnt).returncode == 0
