"""Bounded fuzzing of the compressed read path: mutate bytes of small compressed images.

Property: the reader returns data of exactly the requested length or raises the
project's own errors (ErofsMountError) -- never another exception, never a hang (every
loop in zmap/zdata is bounded by the index count), never a large allocation (tracemalloc
peak per example).  A mutated compressed payload that still decodes cleanly cannot be
told apart from real data (EROFS has no data checksums; the kernel returns it too), so
the content itself is only compared for unmutated images.

Mutations land on bytes the reader actually reads (recorded on a clean run): superblock,
inodes, map headers, lcluster indexes, inline tails and the pclusters themselves.  The
superblock checksum is recomputed so metadata mutations get past it, as the corpus'
corrupt.py does.  Runtime is bounded by max_examples (about a minute in total).
"""

from __future__ import annotations

import importlib.util
import os
import random
import shutil
import subprocess
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from erofs_mount.errors import ErofsMountError
from erofs_mount.erofs.image import Image
from erofs_mount.erofs.superblock import crc32c_raw

MKFS15 = shutil.which("mkfs.erofs")
PEAK_LIMIT = 48 * 1024 * 1024
SETTINGS = dict(max_examples=250, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _tree(root: str) -> None:
    rng = random.Random(3)
    words = [b"lorem ", b"ipsum ", b"dolor ", b"sit ", b"amet\n", b"consectetur "]

    def text(n: int) -> bytes:
        return b"".join(rng.choice(words) for _ in range(n // 5 + 1))[:n]

    os.makedirs(os.path.join(root, "d"))
    files = {"a": text(70_000), "b": text(5000) + rng.randbytes(5000) + text(9000), "c": text(4097),
             "d/e": bytes(40_000) + text(100), "d/f": text(300), "g": text(20_000)}
    for rel, data in files.items():
        with open(os.path.join(root, rel), "wb") as f:
            f.write(data)


class Target:
    def __init__(self, data: bytes, paths: list[str]) -> None:
        self.data = data
        self.paths = paths
        self.expected = {}
        touched: set[int] = set()
        meta: set[int] = set()

        def rec(pos: int, n: int) -> bytes:
            touched.update(range(pos, min(pos + n, len(data))))
            return data[pos:pos + n]

        img = Image(rec, size=len(data))
        read_meta = img.read_meta

        def rec_meta(pos: int, n: int, in_metabox: bool = False) -> bytes:
            if not in_metabox:  # metabox positions are offsets in its decoded data, not in the image
                meta.update(range(pos, min(pos + n, len(data))))
            return read_meta(pos, n, in_metabox)

        img.read_meta = rec_meta    # the exact metadata bytes: inodes, dirents, map headers, indexes, tails
        for p in paths:
            nid = img.resolve(p)
            self.expected[p] = img.read(nid, 0, img.inode(nid).size)
        self.hot = sorted(touched)
        self.meta = sorted(meta)


def _fix_sb_checksum(buf: bytearray) -> None:
    compat = int.from_bytes(buf[1032:1036], "little")
    if not compat & 1:
        return
    bs = 1 << buf[1036] if 9 <= buf[1036] <= 16 else 4096
    length = bs - 1024 if bs > 1024 else bs
    area = bytes(buf[1024:1024 + 4]) + b"\0\0\0\0" + bytes(buf[1032:1024 + length])
    buf[1028:1032] = crc32c_raw(0xFFFFFFFF, area).to_bytes(4, "little")


@pytest.fixture(scope="module")
def targets(tmp_path_factory):
    out = {}
    if MKFS15:
        root = tmp_path_factory.mktemp("zfuzz")
        _tree(str(root / "t"))
        for name, opts in {"compact-big": ["-zlz4hc", "-C16384"],
                           "legacy-tail": ["-zlz4hc", "-Elegacy-compress", "-Eztailpacking"]}.items():
            img = str(root / f"{name}.erofs")
            subprocess.run(["mkfs.erofs", "--quiet", "-T1700000000", *opts, img, str(root / "t")], check=True,
                           timeout=120)
            with open(img, "rb") as f:
                out[name] = Target(f.read(), ["/a", "/b", "/c", "/d/e", "/d/f", "/g"])
    # erofs-utils 1.9.3 layouts (embedded in test_znewmkfs.py): loaded by path, whatever the import mode
    spec = importlib.util.spec_from_file_location("_znewmkfs_images", Path(__file__).with_name("test_znewmkfs.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for key, name in EMBEDDED.items():
        paths = ["/text", "/mixed", "/dup2", "/tails/1", "/zeros", "/rawtail", "/dir/007-xxxxxxx"]
        out[key] = Target(mod.images()[name], paths)
    return out


EMBEDDED = {"all-fragments": "01", "lzma-fragdedupe": "03", "blk1k-ztailpacking": "04", "48bit-zstd-fragments": "05",
            "48bit-deflate-dedupe": "06", "metabox-zdirs": "07", "legacy-big-fragments-dedupe": "10"}


def _exercise(buf: bytes, target: Target, rng: random.Random) -> None:
    try:
        img = Image(lambda pos, n: buf[pos:pos + n], size=len(buf))
        img.zreader.cache_limit = 4 * 1024 * 1024
    except ErofsMountError:
        return
    for p in target.paths:
        try:
            nid = img.resolve(p)
            size = img.inode(nid).size     # a mutated i_size may be huge: requests stay bounded
            want = min(size, 1 << 22)
            assert len(img.read(nid, 0, want)) == want
            if size:
                off = rng.randrange(size)
                n = rng.randrange(1, 100_000)
                assert len(img.read(nid, off, n)) == min(n, size - off)
        except ErofsMountError:
            pass


def test_unmutated_targets_read_back(targets):
    for t in targets.values():
        img = Image(lambda pos, n, d=t.data: d[pos:pos + n], size=len(t.data))
        for p, want in t.expected.items():
            assert img.read(img.resolve(p), 0, len(want)) == want


@pytest.mark.parametrize("name", ["compact-big", "legacy-tail", *EMBEDDED])
@settings(**SETTINGS)
@given(data=st.data())
def test_mutated_images_fail_cleanly(targets, name, data):
    if name not in targets:
        pytest.skip("mkfs.erofs (erofs-utils) not installed")
    t = targets[name]
    if not t.meta:
        t.meta = t.hot
    buf = bytearray(t.data)
    for _ in range(data.draw(st.integers(1, 6))):
        where = data.draw(st.integers(0, 9))
        if where < 5:
            pos = t.meta[data.draw(st.integers(0, len(t.meta) - 1))]
        elif where < 8:
            pos = t.hot[data.draw(st.integers(0, len(t.hot) - 1))]
        else:
            pos = data.draw(st.integers(0, len(buf) - 1))
        kind = data.draw(st.integers(0, 2))
        if kind == 0:
            buf[pos] = data.draw(st.integers(0, 255))
        elif kind == 1:
            buf[pos] ^= 1 << data.draw(st.integers(0, 7))
        else:
            buf[pos:pos + 4] = data.draw(st.sampled_from([b"\0\0\0\0", b"\xff\xff\xff\xff", b"\x01\x00\x00\x80"]))
    _fix_sb_checksum(buf)
    tracemalloc.start()
    try:
        _exercise(bytes(buf), t, random.Random(data.draw(st.integers(0, 1 << 30))))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < PEAK_LIMIT
