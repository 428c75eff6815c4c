"""Compressed images built at test time by mkfs.erofs from a generated tree, read back byte for byte.

Debian's mkfs.erofs 1.5 (lz4/lz4hc only) covers compact and legacy indexes, big
pclusters, ztailpacking and small ``--max-extent-bytes``.  A newer mkfs (erofs-utils
>= 1.8, e.g. a local build of 1.9.3) named by ``EROFS_MKFS_NEW=/path/to/mkfs.erofs``
adds lzma/deflate/zstd, fragments, all-fragments, dedupe/fragdedupe, 48-bit extents,
1024/512-byte blocks, compressed directories and the metabox; without it those cases skip.
"""

from __future__ import annotations

import os
import random
import shlex
import shutil
import stat
import subprocess
import sys

import pytest

from erofs_mount.erofs.image import Image

MKFS15 = shutil.which("mkfs.erofs")
MKFS_NEW = os.environ.get("EROFS_MKFS_NEW")

OPTS_15 = [
    "-zlz4", "-zlz4hc", "-zlz4hc -C65536", "-zlz4hc -Elegacy-compress", "-zlz4hc -Elegacy-compress -C65536",
    "-zlz4hc -Eztailpacking", "-zlz4hc -Eztailpacking -C16384", "-zlz4 --max-extent-bytes=8192",
    "-zlz4hc -Elegacy-compress -Eztailpacking -C32768 --max-extent-bytes=16384",
]
OPTS_NEW = [
    "-zlzma", "-zdeflate", "-zzstd", "-zlzma,level=6 -C1048576", "-zlz4hc -Efragments",
    "-zlz4hc -Eall-fragments", "-zlz4hc -Efragments,dedupe", "-zlzma -Efragments,dedupe",
    "-zlz4hc -Efragments,fragdedupe=full", "-zlz4hc -Eall-fragments,fragdedupe=inode", "-zlz4hc -Ededupe -C65536",
    "-zlz4hc -E48bit", "-zzstd -E48bit -C65536", "-zzstd -E48bit -Efragments,dedupe",
    "-zlz4hc -E48bit --max-extent-bytes=16384", "-zlzma -E48bit -Eztailpacking", "-zlz4hc --zD",
    "-zlz4hc -m4096:lzma", "-zlz4hc -m4096:lzma --zD", "-zlz4hc -b1024", "-zlz4hc -b1024 -C8192 -Eztailpacking",
    "-zlzma -b1024 -Efragments", "-zlz4hc -b512 -Eall-fragments", "-zlz4 --max-extent-bytes=4096 -Efragments",
    "-zdeflate -Elegacy-compress -C65536", "-zlz4hc -Elegacy-compress -Efragments,dedupe -C32768",
    "-zdeflate -E48bit -Ededupe -b1024", "-zlz4hc -Eztailpacking,dedupe",
]

WORDS = b"alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()


def _text(rng: random.Random, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        out += rng.choice(WORDS) + (b"\n" if rng.random() < 0.1 else b" ")
    return bytes(out[:n])


def make_tree(root: str, seed: int = 1) -> dict[str, bytes]:
    """Files that exercise pcluster boundaries, PLAIN lclusters, zero runs, dedupe and shared tails."""
    rng = random.Random(seed)
    files: dict[str, bytes] = {}

    def put(rel: str, data: bytes) -> None:
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
        files[rel] = data

    for n in (0, 1, 17, 511, 4095, 4096, 4097, 8191, 8193, 65535, 65536, 65537, 131073):
        put(f"sizes/t-{n}", _text(rng, n))
    put("zeros-1m", bytes(1 << 20) + _text(rng, 3000))
    mixed = bytearray()
    for i in range(24):     # every third block incompressible: PLAIN (uncompressed) lclusters
        mixed += rng.randbytes(4096) if i % 3 == 1 else _text(rng, 4096 + rng.randrange(-700, 700))
    put("mixed", bytes(mixed))
    put("random-20k", rng.randbytes(20000))
    put("raw-tail", _text(rng, 10000) + rng.randbytes(1500))     # incompressible inline tail
    big = _text(rng, 700_000)
    put("big", big)
    put("dup/a", big[:300_000])
    put("dup/b", big[:300_000])
    put("dup/c", _text(rng, 5000) + big[100_000:200_000])
    tail = _text(rng, 3000)
    for i in range(6):
        put(f"tails/f{i}", _text(rng, 10_000 + 999 * i) + tail)
    for i in range(150):
        put(f"many/{i:04d}-" + "n" * (i % 40), _text(rng, rng.randrange(0, 300)))
    return files


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("ztree")
    return str(root / "t"), make_tree(str(root / "t"))


def build(mkfs: str, opts: str, src: str, out: str) -> Image:
    res = subprocess.run([mkfs, "--quiet", "-T1700000000", *shlex.split(opts), out, src], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    with open(out, "rb") as f:
        data = f.read()
    return Image(lambda pos, n: data[pos:pos + n], size=len(data))


def check_image(img: Image, files: dict[str, bytes], seed: int = 0) -> None:
    rng = random.Random(seed)
    for rel, data in sorted(files.items()):
        nid = img.resolve("/" + rel)
        assert img.read(nid, 0, len(data) + 10) == data, rel
        for _ in range(4):      # random ranges, some crossing extents and EOF
            if not data:
                break
            off = rng.randrange(len(data))
            n = rng.randrange(1, 70000)
            assert img.read(nid, off, n) == data[off:off + n], (rel, off, n)
    names = sorted(e.name for e in img.iterdir(img.resolve("/many")) if e.name not in (b".", b".."))
    assert names == sorted(os.fsencode(k.split("/", 1)[1]) for k in files if k.startswith("many/"))


@pytest.mark.skipif(not MKFS15, reason="mkfs.erofs (erofs-utils) not installed")
@pytest.mark.parametrize("opts", OPTS_15)
def test_mkfs15_images_read_back(tree, tmp_path, opts):
    src, files = tree
    img = build(MKFS15, opts, src, str(tmp_path / "z.erofs"))
    check_image(img, files)


@pytest.mark.skipif(not MKFS_NEW, reason="set EROFS_MKFS_NEW to a newer mkfs.erofs (>= 1.8) for these layouts")
@pytest.mark.parametrize("opts", OPTS_NEW)
def test_newer_mkfs_images_read_back(tree, tmp_path, opts):
    src, files = tree
    img = build(MKFS_NEW, opts, src, str(tmp_path / "z.erofs"))
    check_image(img, files)


@pytest.mark.skipif(not MKFS15, reason="mkfs.erofs (erofs-utils) not installed")
@pytest.mark.parametrize("opts", ["-zlz4hc", "-zlz4hc -C65536", "-zlz4hc -Elegacy-compress -Eztailpacking"])
def test_sequential_4k_reads_decompress_each_pcluster_once(tree, tmp_path, opts):
    src, files = tree
    img = build(MKFS15, opts, src, str(tmp_path / "z.erofs"))
    nid = img.resolve("/big")
    size = len(files["big"])
    zr = img.zreader
    before = zr.stats()
    pieces = [img.read(nid, off, 4096) for off in range(0, size, 4096)]
    assert b"".join(pieces) == files["big"]
    st = zr.stats()
    misses, hits = st["misses"] - before["misses"], st["hits"] - before["hits"]
    pclusters = {(ext.pa, ext.plen) for ext in zr.extents(img.inode(nid))}
    assert misses == len(pclusters)
    assert hits + misses >= len(pieces)


@pytest.mark.skipif(not MKFS15, reason="mkfs.erofs (erofs-utils) not installed")
def test_cache_is_bounded(tree, tmp_path):
    src, files = tree
    img = build(MKFS15, "-zlz4hc -C65536", src, str(tmp_path / "z.erofs"))
    img.zreader.cache_limit = 300_000
    for rel, data in files.items():
        # 3000-byte requests: extents read in part are kept (whole ones would not be)
        nid = img.resolve("/" + rel)
        assert b"".join(img.read(nid, off, 3000) for off in range(0, len(data), 3000)) == data
        assert img.zreader.stats()["cache_bytes"] <= 300_000
    st = img.zreader.stats()
    assert st["evictions"] > 0 and st["bytes_decompressed"] > 300_000


# ---------------------------------------------------------------------------- the corpus tree, another seed
MAKE_TREE = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "corpus", "make_tree.py")


@pytest.fixture(scope="module")
def corpus_tree(tmp_path_factory):
    if not os.path.exists(MAKE_TREE):
        pytest.skip("the corpus' make_tree.py is not available")
    if os.geteuid() != 0:
        pytest.skip("make_tree.py needs root (device nodes, ownership)")
    root = str(tmp_path_factory.mktemp("corpustree") / "t")
    res = subprocess.run([sys.executable, MAKE_TREE, "--seed", "5", root], capture_output=True, text=True,
                         timeout=300)
    if res.returncode:
        pytest.skip(f"make_tree.py failed: {res.stderr[-300:]}")
    files = {}
    broot = os.fsencode(root)
    for dirpath, _, names in os.walk(broot):    # bytes: the tree has non-UTF-8 names
        for name in names:
            path = os.path.join(dirpath, name)
            if stat.S_ISREG(os.lstat(path).st_mode):
                with open(path, "rb") as f:
                    files[b"/" + os.path.relpath(path, broot)] = f.read()
    return root, files


@pytest.mark.skipif(not MKFS15, reason="mkfs.erofs (erofs-utils) not installed")
@pytest.mark.parametrize("opts", ["-zlz4hc -Elegacy-compress", "-zlz4hc -C65536", "-zlz4 -Eztailpacking"])
def test_regenerated_corpus_tree_reads_back(corpus_tree, tmp_path, opts):
    """The held-out corpus is the same recipes on another seed: mkfs 1.5 on a seed-5 tree, every file compared."""
    root, files = corpus_tree
    img = build(MKFS15, opts + " --exclude-regex=[^/]{255}$", root, str(tmp_path / "z.erofs"))
    checked = 0
    for path, data in files.items():
        if len(os.path.basename(path)) >= 254:     # mkfs 1.5 cannot store 255-byte names
            continue
        nid = img.resolve(path)
        assert img.read(nid, 0, len(data) + 1) == data, path
        checked += 1
    assert checked > 3000
