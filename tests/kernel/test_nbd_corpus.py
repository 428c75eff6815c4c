"""Every corpus image the kernel supports mounts through NBD and matches its kernel manifest;
unmounting leaves nothing behind (no device, daemon or record)."""

from __future__ import annotations

import subprocess
from contextlib import contextmanager

import pytest

from tests import corpuslib

from .helpers import CHECK_TREE, check_tree, mount, nothing_left, options, wait_until
from erofs_mount.backends.nbd import lifecycle

SUPPORTED = [i.name for i in corpuslib.images() if i.kernel_6_1 and i.info.get("manifest")]


@pytest.fixture(scope="module")
def shared_corpus():
    if not CHECK_TREE.exists():
        pytest.skip(f"{CHECK_TREE} is absent (the shared corpus is not mounted here)")


@contextmanager
def loop_devices(paths):
    """Extra devices (multi-device images) as read-only loop devices, for ``-o device=``."""
    loops = []
    try:
        for p in paths:
            res = subprocess.run(["losetup", "-r", "-f", "--show", str(p)], capture_output=True, text=True,
                                 timeout=30)
            assert res.returncode == 0, res.stderr
            loops.append(res.stdout.strip())
        yield loops
    finally:
        for dev in loops:
            subprocess.run(["losetup", "-d", dev], timeout=30)


@pytest.mark.parametrize("name", SUPPORTED)
def test_corpus_image_through_nbd(name, shared_corpus, tmp_path):
    img = corpuslib.image(name)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with loop_devices(img.devices) as loops:
        opts = options(tmp_path, mount_data=",".join(f"device={d}" for d in loops))
        index = mount(img.path, mnt, opts)
        try:
            # corrupt images that mount fail where the kernel failed: --lenient-errors (corpus README)
            extra = ("--lenient-errors",) if img.expect == "refuse" else ()
            res = check_tree(img.manifest, mnt, *extra)
            assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
            assert res.stdout.strip().splitlines()[-1].endswith(" 0 failed")
        finally:
            assert lifecycle.unmount(str(mnt)) == 0
    wait_until(lambda: not nothing_left(index), 10, "nothing left")
