"""Compressed corpus images through the pure reader: every regular file's sha256 equals the kernel's.

Also random byte ranges (hypothesis) against the source tree, the decoded-pcluster
cache on sequential 4 KiB reads, and the two damaged compressed images (a garbage
pcluster: EUCLEAN for that file only; a truncated image: EIO past the end).
"""

from __future__ import annotations

import errno
import hashlib
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from erofs_mount.errors import CorruptedError, ErofsMountError, SourceError
from erofs_mount.erofs.image import Image
from tests import corpuslib

COMPRESSED = ["lz4", "lz4hc-pcluster-64k", "lzma-pcluster-1m", "deflate", "zstd", "mkfs15-legacy-lz4hc",
              "ztailpacking-lz4hc", "fragments-dedupe-lz4hc", "48bit-zstd", "zdirs-lz4hc", "metabox-lzma-lz4hc",
              "compact-allroot-lz4", "xattr-prefix-nofilter-lz4", "corrupt-base-lz4hc"]


def _open(name: str):
    try:
        img = corpuslib.image(name)
    except (KeyError, FileNotFoundError) as exc:
        pytest.skip(f"corpus image {name} not available: {exc}")
    fd = os.open(img.path, os.O_RDONLY)
    size = os.fstat(fd).st_size
    return img, Image(lambda pos, n: os.pread(fd, n, pos), size=size), fd


@pytest.fixture
def opened(request):
    handles = []

    def do(name):
        img, image, fd = _open(name)
        handles.append(fd)
        return img, image

    yield do
    for fd in handles:
        os.close(fd)


def _regular_files(manifest: dict) -> dict[str, dict]:
    return {p: e for p, e in manifest["entries"].items() if e.get("type") == "reg" and "sha256" in e}


@pytest.mark.parametrize("name", COMPRESSED)
def test_every_regular_file_matches_the_kernel(opened, name):
    img, image = opened(name)
    manifest = corpuslib.load_manifest(img.manifest)
    files = _regular_files(manifest)
    assert files
    bad = []
    compressed = 0
    for path, entry in files.items():
        nid = image.resolve(path)
        inode = image.inode(nid)
        compressed += inode.is_compressed
        data = image.read(nid, 0, inode.size + 1)
        if len(data) != entry["size"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
            bad.append(path)
    assert not bad, f"{len(bad)} files differ, first: {bad[:5]}"
    assert compressed > 0
    st_ = image.zreader.stats()
    assert st_["errors"] == 0 and st_["misses"] > 0


@pytest.mark.parametrize("name", [n for n in COMPRESSED if n != "corrupt-base-lz4hc"])   # (a smaller tree)
def test_random_ranges_equal_the_source_tree(opened, name):
    img, image = opened(name)
    try:
        sources = corpuslib.source_files()
    except (FileNotFoundError, KeyError) as exc:
        pytest.skip(f"source tree oracle not available: {exc}")
    manifest = corpuslib.load_manifest(img.manifest)
    paths = sorted(p for p, e in _regular_files(manifest).items() if p in sources and e["size"] > 0)

    @settings(max_examples=150, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(st.sampled_from(paths), st.floats(0, 1), st.integers(1, 300_000))
    def check(path, frac, n):
        size = sources[path][1]
        off = min(int(frac * size), size - 1)
        got = image.read(image.resolve(path), off, n)
        assert got == corpuslib.source_bytes(path, off, n), (path, off, n)

    check()


@pytest.mark.parametrize("name", ["lz4", "lz4hc-pcluster-64k", "lzma-pcluster-1m", "zstd", "48bit-zstd"])
def test_sequential_4k_reads_decode_each_pcluster_once(opened, name):
    img, image = opened(name)
    manifest = corpuslib.load_manifest(img.manifest)
    path, entry = max(_regular_files(manifest).items(), key=lambda kv: kv[1]["size"])
    nid = image.resolve(path)
    zr = image.zreader
    zr.clear_cache()
    before = zr.stats()
    h = hashlib.sha256()
    for off in range(0, entry["size"], 4096):
        h.update(image.read(nid, off, 4096))
    assert h.hexdigest() == entry["sha256"]
    st_ = zr.stats()
    misses, hits = st_["misses"] - before["misses"], st_["hits"] - before["hits"]
    pclusters = {(ext.kind, ext.pa, ext.plen) for ext in zr.extents(image.inode(nid))}
    assert misses == len(pclusters)
    assert hits >= -(-entry["size"] // 4096) - misses


def test_garbage_pcluster_fails_that_file_only(opened):
    img, image = opened("corrupt-pcluster-garbage")
    manifest = corpuslib.load_manifest(img.manifest)
    target = img.info["corruption"]["target"]
    for path, entry in _regular_files(manifest).items():
        nid = image.resolve(path)
        if path == target:
            with pytest.raises(CorruptedError) as ei:
                image.read(nid, 0, entry["size"])
            assert ei.value.errno == errno.EUCLEAN
            assert f"inode {nid}" in str(ei.value) and "logical offset" in str(ei.value)
        else:
            assert hashlib.sha256(image.read(nid, 0, entry["size"])).hexdigest() == entry["sha256"], path
    assert "error" in manifest["entries"][target]


def test_truncated_image_gives_eio_past_the_end(opened):
    img, image = opened("corrupt-truncated")
    manifest = corpuslib.load_manifest(img.manifest)
    checked = 0
    for path, entry in manifest["entries"].items():
        if entry.get("type") != "reg":
            continue
        kernel = entry.get("error")
        try:
            nid = image.resolve(path)
            inode = image.inode(nid)
        except ErofsMountError:
            assert kernel, f"{path}: the kernel could stat it"
            continue
        if kernel and kernel["op"] == "read":
            with pytest.raises(SourceError) as ei:
                image.read(nid, 0, inode.size)
            assert ei.value.errno == errno.EIO
            checked += 1
        elif not kernel:
            assert hashlib.sha256(image.read(nid, 0, inode.size)).hexdigest() == entry["sha256"], path
    assert checked > 0
