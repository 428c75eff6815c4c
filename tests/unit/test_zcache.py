"""The compressed read path's caches (erofs/zmap.py, zindex.py, zdata.py) on mkfs.erofs images.

* the per-inode memos of decoded lclusters and compacted packs stay within their bounds;
* they hold no state that could go stale: many threads reading random ranges of the same
  files through one reader, with a pcluster LRU small enough to evict all the time, get
  exactly the source bytes;
* corruption is still reported per file and on every read (failures are never memoized),
  while the other files read correctly, also concurrently.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import threading
import time

import pytest

from erofs_mount.errors import CorruptedError
from erofs_mount.erofs import zmap as Z
from erofs_mount.erofs.image import Image
from erofs_mount.erofs.superblock import crc32c_raw

MKFS = shutil.which("mkfs.erofs")
pytestmark = pytest.mark.skipif(not MKFS, reason="mkfs.erofs (erofs-utils) not installed")
WORDS = b"north south east west up down left right red green blue cyan magenta yellow".split()


def text(rng: random.Random, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        out += rng.choice(WORDS) + (b"\n" if rng.random() < 0.1 else b" ")
    return bytes(out[:n])


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("zc") / "t"
    root.mkdir()
    rng = random.Random(7)
    files = {"huge": text(rng, 6 << 20), "victim": text(rng, 300_000)}
    for i in range(12):
        files[f"f{i:02d}"] = text(rng, rng.randrange(1000, 400_000)) + rng.randbytes(rng.randrange(0, 9000))
    for name, data in files.items():
        (root / name).write_bytes(data)
    return root, files


def image_bytes(tree, tmp_path, opts: str) -> bytearray:
    out = tmp_path / "z.erofs"
    res = subprocess.run([MKFS, "--quiet", "-T1700000000", *opts.split(), str(out), str(tree)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return bytearray(out.read_bytes())


def open_image(data: bytearray) -> Image:
    return Image(lambda pos, n: bytes(data[pos:pos + n]), size=len(data))


@pytest.mark.parametrize("opts", ["-zlz4hc", "-zlz4hc -Elegacy-compress", "-zlz4 -C65536"])
def test_index_memos_stay_bounded(tree, tmp_path, opts):
    root, files = tree
    img = open_image(image_bytes(root, tmp_path, opts))
    nid = img.resolve("/huge")
    data = files["huge"]
    for off in range(0, len(data), 40_000):
        assert img.read(nid, off, 40_000) == data[off:off + 40_000]
    zm = img.zreader._maps[nid][0]
    assert zm.nlclusters > Z._LC_MEMO     # the file has more lclusters than the memo keeps
    assert 0 < len(zm._lcs) <= Z._LC_MEMO and len(zm._packs) <= Z._PACK_MEMO
    assert len(zm._windows) <= 8
    st = img.zreader.stats()
    assert st["cache_bytes"] <= st["cache_limit"]


def test_concurrent_readers_get_exact_bytes(tree, tmp_path):
    root, files = tree
    img = open_image(image_bytes(root, tmp_path, "-zlz4hc"))
    zr = img.zreader
    zr.cache_limit = 256 * 1024         # a few dozen pclusters: constant eviction under 8 readers
    nids = {name: img.resolve("/" + name) for name in files}
    errors: list[BaseException] = []
    deadline = time.monotonic() + 60

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(250):
                if time.monotonic() > deadline:
                    break
                name = rng.choice(sorted(files))
                data = files[name]
                off = rng.randrange(len(data))
                n = rng.choice((1, 4096, 65536, 131072, rng.randrange(1, 300_000)))
                got = img.read(nids[name], off, n)
                assert got == data[off:off + n], (name, off, n)
        except BaseException as exc:    # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors[0]
    st = zr.stats()
    assert st["cache_bytes"] <= zr.cache_limit and st["evictions"] > 0 and st["errors"] == 0
    assert st["cache_bytes"] == sum(len(v) for v in zr._cache.values())


def _break_first_lcluster(data: bytearray, img: Image, nid: int) -> None:
    """Make lcluster 0 of a compacted index a NONHEAD with delta[0] = 0 (a bogus lookback)."""
    img.read(nid, 0, 1)
    zm = img.zreader._maps[nid][0]
    assert zm.layout == Z.EROFS_INODE_COMPRESSED_COMPACT
    pos = zm._c_ebase
    encodebits = 16 if zm._c4_initial else 14      # a 4b pack first, or straight into 2b packs
    v = int.from_bytes(data[pos:pos + 2], "little")
    v = (v & ~((1 << encodebits) - 1)) | (Z.Z_EROFS_LCLUSTER_TYPE_NONHEAD << 12)
    data[pos:pos + 2] = v.to_bytes(2, "little")
    # the index may share block 0 with the superblock: keep its checksum valid
    area = bytes(data[1024:1028]) + bytes(4) + bytes(data[1032:4096])
    data[1028:1032] = crc32c_raw(0xFFFFFFFF, area).to_bytes(4, "little")


def test_corruption_reported_per_file_on_every_read(tree, tmp_path):
    root, files = tree
    data = image_bytes(root, tmp_path, "-zlz4hc")
    _break_first_lcluster(data, open_image(data), open_image(data).resolve("/victim"))
    img = open_image(data)
    victim = img.resolve("/victim")
    for _ in range(3):      # never memoized as a success
        with pytest.raises(CorruptedError) as ei:
            img.read(victim, 0, 100)
        assert f"inode {victim}" in str(ei.value)
    errors: list[BaseException] = []

    def other(name: str) -> None:
        try:
            nid = img.resolve("/" + name)
            d = files[name]
            for off in range(0, len(d), 50_000):
                assert img.read(nid, off, 50_000) == d[off:off + 50_000]
                with pytest.raises(CorruptedError):
                    img.read(victim, 0, 10)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=other, args=(n,)) for n in ("f00", "f01", "f02", "huge")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    assert not any(t.is_alive() for t in threads) and not errors, errors[:1]
    assert img.zreader.stats()["errors"] > 0
