"""`erofs-mount extract` of every valid corpus image equals the kernel's view (all fields but dir size/nlink)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from erofs_mount.cli import main
from tests import corpuslib
from tests.conftest import zdata_available

VALID = corpuslib.names(expect="ok")


def extract_args(img) -> list[str]:
    args = []
    for dev in img.devices:
        args += ["--device", str(dev)]
    return args


@pytest.mark.parametrize("name", VALID)
def test_extract_matches_kernel_manifest(name, tmp_path, capsysbinary):
    img = corpuslib.image(name)
    if img.compressed and not zdata_available():
        pytest.skip("compressed data support not present")
    dest = tmp_path / "out"
    rc = main(["extract", *extract_args(img), str(img.path), str(dest)])
    err = capsysbinary.readouterr().err.decode("utf-8", "replace")
    assert rc == 0, err
    manifest = corpuslib.load_manifest(img.manifest)
    bad = corpuslib.compare_tree(manifest, dest, dir_size=False, dir_nlink=False)
    assert not bad, f"{len(bad)} mismatches, first: {bad[:10]}"
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_extract_tar_index_flat_form(tmp_path, capsysbinary):
    """The index followed by the tar in one file needs no device (the kernel's "flat" device mapping)."""
    img = corpuslib.image("tar-index-gzinfo")
    flat = tmp_path / "flat.erofs"
    with open(flat, "wb") as out:
        for part in (img.path, corpuslib.tree_tar()):
            out.write(part.read_bytes())
    rc = main(["extract", str(flat), str(tmp_path / "out")])
    assert rc == 0, capsysbinary.readouterr().err.decode("utf-8", "replace")
    bad = corpuslib.compare_tree(corpuslib.load_manifest(img.manifest), tmp_path / "out", dir_size=False,
                                 dir_nlink=False)
    assert not bad, bad[:10]


def test_extract_multidev_without_device_names_the_problem(tmp_path, capsysbinary):
    img = corpuslib.image("multidev-chunk-4k")
    rc = main(["extract", str(img.path), str(tmp_path / "out")])
    err = capsysbinary.readouterr().err.decode("utf-8", "replace")
    assert rc == 1, err[-3000:]
    assert "no --device was given" in err and "Traceback" not in err


def test_extract_subtree(tmp_path, capsysbinary):
    img = corpuslib.image("plain-inline-4k")
    rc = main(["extract", str(img.path), str(tmp_path / "out"), "/special"])
    assert rc == 0, capsysbinary.readouterr().err.decode("utf-8", "replace")
    manifest = corpuslib.load_manifest(img.manifest)["entries"]
    assert sorted(os.listdir(tmp_path / "out")) == sorted(manifest["/special"]["children"])


@pytest.mark.skipif(not (corpuslib.SHARED / "check_tree.py").exists(), reason="../shared/corpus not present")
@pytest.mark.parametrize("name", ["plain-inline-4k", "blk-512"])
def test_extract_passes_corpus_check_tree(name, tmp_path):
    """The corpus' own verifier agrees (cross-check of our comparison code)."""
    img = corpuslib.image(name)
    dest = tmp_path / "out"
    assert main(["extract", str(img.path), str(dest)]) == 0
    r = subprocess.run([sys.executable, str(corpuslib.SHARED / "check_tree.py"), "--no-dir-size",
                        "--no-dir-nlink", str(img.manifest), str(dest)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:]
    assert r.stdout.strip().endswith(" 0 failed")
