"""Local tar layer files (tar, tar+gzip, tar+zstd) read through the tar index: the tools, a FUSE
mount, the index cache, the kernel over index + tar, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from erofs_mount.sources.tarlayer import local_kind, store
from erofs_mount.sources.tarlayer.openlayer import open_local_layer
from tests import corpuslib
from tests.conftest import run_cli

from .conftest import VARIANTS, oracle

KIND = {".tar": "tar", ".gz": "gzip", ".zst": "zstd"}


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("EROFS_MOUNT_CACHE_DIR", str(root))
    return root


def cli_env(cache: Path) -> dict:
    return {**os.environ, "EROFS_MOUNT_CACHE_DIR": str(cache)}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_extract_every_shape_equals_the_tree(layers, name, tmp_path, private_cache):
    path = layers.path(name)
    assert local_kind(str(path)) == KIND[path.suffix]
    dest = tmp_path / "out"
    res = run_cli("extract", str(path), str(dest), env=cli_env(private_cache))
    assert res.returncode == 0, res.stderr
    bad = corpuslib.compare_tree(oracle(), dest, dir_size=False, skip=VARIANTS[name])
    assert bad == [], bad[:10]


def test_tools_on_a_layer(layers, private_cache):
    gz = str(layers.path("gnutar.tar.gz"))
    env = cli_env(private_cache)
    res = run_cli("cat", gz, "/README.txt", env=env)
    assert res.returncode == 0, res.stderr
    import hashlib

    assert hashlib.sha256(res.stdout).hexdigest() == oracle()["entries"]["/README.txt"]["sha256"]
    res = run_cli("ls", "-l", gz, "/", env=env)
    assert res.returncode == 0 and b"bigdir" in res.stdout, res.stderr
    res = run_cli("inspect", gz, env=env)
    assert res.returncode == 0 and b"512" in res.stdout, res.stdout


def _open(path, kind, cache_root):
    async def main():
        src = await open_local_layer(str(path), kind, cache_root=cache_root)
        head = await src.read_at(0, 2048)
        await src.aclose()
        return src, head
    return trio.run(main)


def entry_of(cache: Path) -> Path:
    (entry,) = list((cache / "local").iterdir())
    return entry


def test_index_cached_reused_and_verified(layers, tmp_path, caplog):
    cache = tmp_path / "c"
    gz = layers.path("gnutar.tar.gz")
    caplog.set_level("INFO", logger="erofs_mount.sources.tarlayer")
    src1, head1 = _open(gz, "gzip", str(cache))
    entry = entry_of(cache)
    assert sorted(p.name for p in entry.iterdir()) == ["tarindex.erofs", "tarindex.json", "tarindex.zinfo"]
    assert "indexed" in caplog.text
    caplog.clear()
    src2, head2 = _open(gz, "gzip", str(cache))
    assert "from the cache" in caplog.text and "indexed" not in caplog.text
    assert head1 == head2 and src1.size == src2.size
    # a damaged index is noticed, thrown away and rebuilt, never served
    idx = entry / "tarindex.erofs"
    data = bytearray(idx.read_bytes())
    data[1500] ^= 0xFF
    idx.write_bytes(bytes(data))
    caplog.clear()
    src3, head3 = _open(gz, "gzip", str(cache))
    assert "does not match its checksum" in caplog.text and "indexed" in caplog.text
    assert head3 == head1
    # an entry without its .json (a pass that died) is incomplete: rebuilt
    (entry / "tarindex.json").unlink()
    caplog.clear()
    _open(gz, "gzip", str(cache))
    assert "indexed" in caplog.text
    meta = json.loads((entry / "tarindex.json").read_text())
    assert meta["kind"] == "gzip" and meta["source_size"] == gz.stat().st_size


def test_changed_file_gets_a_new_entry(layers, tmp_path):
    cache = tmp_path / "c"
    tar = tmp_path / "layer.tar"
    tar.write_bytes(layers.path("gnutar.tar").read_bytes())
    _open(tar, "tar", str(cache))
    os.utime(tar, ns=(1, 1))
    _open(tar, "tar", str(cache))
    assert len(list((cache / "local").iterdir())) == 2


def _flat_image(layers, tmp_path, name: str) -> Path:
    """Our index followed by the uncompressed tar, as one file (the device NBD mode exports)."""
    cache = tmp_path / "flatcache"
    path = layers.path(name)
    _open(path, KIND[path.suffix], str(cache))
    flat = tmp_path / "flat.erofs"
    with open(flat, "wb") as f:
        f.write((entry_of(cache) / "tarindex.erofs").read_bytes())
        f.write(layers.tar)
    return flat


def test_kernel_mounts_index_plus_tar(layers, tmp_path):
    """The index is a valid EROFS image: the host kernel's erofs driver, loop-mounting index + tar,
    shows exactly the tree."""
    if os.geteuid() != 0 or not os.path.isdir("/sys/module/erofs") and "erofs" not in Path("/proc/filesystems").read_text():
        pytest.skip("needs root and the kernel's erofs driver")
    flat = _flat_image(layers, tmp_path, "gnutar.tar.gz")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "erofs", "-o", "ro,loop", str(flat), str(mnt)], capture_output=True,
                         text=True, timeout=60)
    if res.returncode != 0:
        pytest.fail(f"the kernel refused our tar index: {res.stderr}")
    try:
        bad = corpuslib.compare_tree(oracle(), mnt)
        assert bad == [], bad[:10]
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True, timeout=60)


def test_fsck_accepts_index_plus_tar(layers, tmp_path):
    """Debian 12's fsck.erofs 1.5 knows no 512-byte blocks: a newer one (EROFS_FSCK_NEW, e.g. 1.9.3)."""
    fsck = os.environ.get("EROFS_FSCK_NEW")
    if not fsck or not os.access(fsck, os.X_OK):
        pytest.skip("EROFS_FSCK_NEW does not name a fsck.erofs >= 1.6 (1.5 rejects 512-byte blocks)")
    flat = _flat_image(layers, tmp_path, "gnutar.tar")
    res = subprocess.run([fsck, str(flat)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


# ---- bad input: one line naming the layer and the offset, nothing half-written in the cache ------
def _bad(tmp_path, name: str, data: bytes, private_cache: Path) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    res = run_cli("ls", str(path), "/", env=cli_env(private_cache))
    err = res.stderr.decode()
    assert res.returncode != 0
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert str(path) in err, err
    if (private_cache / "local").exists():
        for entry in (private_cache / "local").iterdir():
            assert not list(entry.iterdir()), list(entry.iterdir())   # nothing left, not even temp files
    return err


def test_truncated_gzip(layers, tmp_path, private_cache):
    data = layers.path("gnutar.tar.gz").read_bytes()
    err = _bad(tmp_path, "cut.tar.gz", data[: len(data) // 2], private_cache)
    assert "offset" in err and ("truncated" in err or "ends" in err), err


def test_corrupt_tar_header(layers, tmp_path, private_cache):
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(layers.tar)) as t:
        members = t.getmembers()
    hdr = members[len(members) // 2].offset
    data = bytearray(layers.tar)
    data[hdr + 5] ^= 0x55              # the name field: the checksum no longer matches
    err = _bad(tmp_path, "bad.tar", bytes(data), private_cache)
    assert "checksum" in err and str(hdr) in err, err


def test_truncated_zstd(layers, tmp_path, private_cache):
    data = layers.path("one-frame.tar.zst").read_bytes()
    err = _bad(tmp_path, "cut.tar.zst", data[: len(data) * 2 // 3], private_cache)
    assert "zstd" in err or "offset" in err, err
