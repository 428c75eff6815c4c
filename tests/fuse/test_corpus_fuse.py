"""Every corpus image through a real FUSE mount, against the kernel's manifest.

Valid images: ``check_tree.py MANIFEST MNT`` with ALL default fields, plus the
opt-in readdir order, st_blocks and statfs checks (and st_ino everywhere but
the root, which FUSE numbers 1).  Without ../shared/corpus the project's own
``corpuslib.compare_tree`` checks the same fields.
Corrupt images: refused with one line (bad magic, bad checksum), or served with
the kernel's errno on exactly the damaged paths (``--strict-errno``) while the
daemon stays alive.
"""

from __future__ import annotations

import os
import shutil

import pytest

from tests import corpuslib

from .conftest import have_check_tree, is_live, run_check_tree, zdata_available, find_pids
from erofs_mount.backends.fuse.mountinfo import find_mount

VALID = corpuslib.names(expect="ok")
CORRUPT = corpuslib.names(expect="refuse")


def _image(name: str):
    img = corpuslib.image(name)
    if img.compressed and not zdata_available():
        pytest.xfail("compressed data support (erofs_mount.erofs.zdata) not present yet")
    return img


def _check(manifest_path, mnt: str, *extra: str) -> None:
    if have_check_tree():
        res = run_check_tree(manifest_path, mnt, *extra)
        tail = res.stdout.strip().splitlines()[-12:]
        assert res.returncode == 0, "\n".join(tail)
        assert res.stdout.strip().splitlines()[-1].endswith(" 0 failed")
    else:
        bad = corpuslib.compare_tree(corpuslib.load_manifest(manifest_path), mnt)
        assert not bad, f"{len(bad)} mismatches, first: {bad[:10]}"


@pytest.mark.parametrize("name", VALID)
def test_valid_image_matches_kernel(name, fuse):
    img = _image(name)
    res = fuse.mount(img.path, devices=img.devices)
    assert res.returncode == 0, res.stderr
    mnt = fuse.mountpoints[-1]
    assert is_live(mnt)
    _check(img.manifest, mnt)
    if have_check_tree():
        # opt-in checks: readdir order, st_blocks, statfs, and st_ino (= nid) except the root
        res = run_check_tree(img.manifest, mnt, "--check-order", "--check-blocks", "--check-statfs",
                             "--check-ino")
        mismatches = [line for line in res.stdout.splitlines() if line.startswith("MISMATCH")]
        assert [m.split(" ")[1:3] for m in mismatches] == [["/", "ino:"]], "\n".join(mismatches[:10])
    assert fuse.unmount(mnt).returncode == 0
    assert find_mount(mnt) is None


def test_tar_index_flat_form(fuse, tmp_path):
    """The tar-index image followed by the tar in one file (the oci.tarindex layout), no --device."""
    img = corpuslib.image("tar-index-gzinfo")
    flat = tmp_path / "flat.erofs"
    with open(flat, "wb") as out:
        for part in (img.path, *img.devices):
            with open(part, "rb") as f:
                shutil.copyfileobj(f, out)
    res = fuse.mount(flat)
    assert res.returncode == 0, res.stderr
    _check(img.manifest, fuse.mountpoints[-1])


@pytest.mark.parametrize("name", CORRUPT)
def test_corrupt_image(name, fuse):
    img = corpuslib.image(name)
    res = fuse.mount(img.path, devices=img.devices)
    mnt = fuse.mountpoints[-1]
    if img.manifest is None:
        # the kernel refuses these (bad magic, bad superblock checksum): so do we, in one line
        assert res.returncode != 0
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("erofs-mount: "), res.stderr
        assert find_mount(mnt) is None
        assert not find_pids(mnt)
        return
    if img.compressed and not zdata_available():
        pytest.xfail("compressed data support (erofs_mount.erofs.zdata) not present yet")
    assert res.returncode == 0, res.stderr
    pids = find_pids(mnt)
    assert len(pids) == 1
    if have_check_tree():
        res = run_check_tree(img.manifest, mnt, "--strict-errno")
        assert res.returncode == 0, "\n".join(res.stdout.strip().splitlines()[-12:])
    else:
        bad = corpuslib.compare_tree(corpuslib.load_manifest(img.manifest), mnt)
        assert not bad, f"{len(bad)} mismatches, first: {bad[:10]}"
    # the daemon survived every error and still answers
    assert is_live(mnt)
    assert find_pids(mnt) == pids
    os.listdir(mnt)
