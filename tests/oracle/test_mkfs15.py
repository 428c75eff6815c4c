"""Debian mkfs.erofs 1.5 images of the everything-tree, in many configurations, checked against the host kernel.

For each configuration: build the image, loop-mount it read-only, record the
kernel's view, then require (a) ``erofs-mount extract`` to reproduce it
(``compare_tree``, directory size/nlink aside) and (b) direct Image API records
to equal it field by field, including st_ino == nid, st_blocks, readdir order,
listxattr order and statfs.

mkfs.erofs 1.5 facts (checked): the block size is fixed at 4096 (no ``-b``),
unknown ``-E`` options such as ``fragments``/``dedupe`` are silently ignored (so
they are not listed here: tests/data/oracle covers them with newer images).
"""

from __future__ import annotations

import os
import random

import pytest

from erofs_mount.cli import main
from tests import corpuslib
from tests.oracle import records
from tests.oracle.conftest import mkfs

T = "1234567890"
BS = 4096
CONFIGS = {
    "plain": [],
    "noinline": ["-Enoinline_data"],
    "compact": ["-Eforce-inode-compact", "--all-root"],   # owners > 65535 need extended inodes
    "extended": ["-Eforce-inode-extended"],
    "fixed-time": ["-T" + T],
    "fixed-time-compact": ["-T" + T, "-Eforce-inode-compact", "--all-root"],
    "ignore-mtime": ["--ignore-mtime"],
    "all-root": ["--all-root"],
    "force-ids": ["--force-uid=70000", "--force-gid=65534"],
    "no-xattrs": ["-x-1"],
    "xattr-share-all": ["-x1"],
    "xattr-share-none": ["-x100"],
    "lz4": ["-zlz4"],
    "lz4hc": ["-zlz4hc"],
    "lz4hc-9-c16k": ["-zlz4hc,9", "-C16384"],
    "lz4hc-c64k": ["-zlz4hc", "-C65536"],
    "lz4-c1m": ["-zlz4", "-C1048576"],
    "lz4hc-ztailpacking": ["-zlz4hc", "-Eztailpacking"],
    "lz4-ztailpacking-c64k": ["-zlz4", "-C65536", "-Eztailpacking"],
    "lz4hc-legacy": ["-zlz4hc", "-Elegacy-compress"],
    "lz4-legacy-c64k": ["-zlz4", "-Elegacy-compress", "-C65536"],
    "lz4hc-extent-8k": ["-zlz4hc", "--max-extent-bytes=8192"],
    "lz4hc-c4k": ["-zlz4hc", "-C4096"],
    "lz4-c8k-ztailpacking-extended": ["-zlz4", "-C8192", "-Eztailpacking,force-inode-extended"],
    "lz4hc-noinline-preserve-mtime": ["-zlz4hc", "-Enoinline_data", "--preserve-mtime"],
    "lz4hc-compact-allroot": ["-zlz4hc", "-Eforce-inode-compact", "--all-root", "-T" + T],
    "chunk-8k": ["--chunksize=8192"],
    "chunk-4k-indexes": ["--chunksize=4096", "-Eforce-chunk-indexes"],
    "chunk-64k-blockmap": ["--chunksize=65536", "-Eforce-inode-blockmap"],
    "chunk-1m": ["--chunksize=1048576"],
    "blobdev-4k": ["--chunksize=4096", "--blobdev={blob}"],
    "blobdev-64k": ["--chunksize=65536", "--blobdev={blob}"],
}


def _compare_ranges(img, mnt, kernel, config: str) -> list[str]:
    """Image.read of odd byte ranges (block edges, EOF, beyond EOF, seeded random) equals the kernel's pread."""
    rng = random.Random(config)
    bad = []
    regs = sorted(p for p, r in kernel[0].items() if r.get("type") == "reg" and r["size"])
    for path in regs[:: max(1, len(regs) // 80)]:
        size = kernel[0][path]["size"]
        nid = img.resolve(path)
        offsets = {0, 1, size - 1, size, size + 5, BS - 1, BS, BS + 1, rng.randrange(size), rng.randrange(size)}
        fd = os.open(os.fsencode(str(mnt)) + os.fsencode(path), os.O_RDONLY)
        try:
            for off in sorted(offsets):
                for n in (1, 7, BS, BS + 3, rng.randrange(1, 3 * BS)):
                    want = os.pread(fd, n, off)
                    got = img.read(nid, off, n)
                    if got != want:
                        bad.append(f"{path} [{off}:+{n}]: kernel {len(want)} bytes, ours {len(got)} bytes differ")
        finally:
            os.close(fd)
    return bad


@pytest.fixture(scope="module")
def stats():
    out = {"images": 0, "paths": 0}
    yield out
    print(f"\noracle mkfs 1.5: {out['images']} images compared, {out['paths']} paths")


@pytest.mark.parametrize("config", list(CONFIGS))
def test_mkfs15_config_matches_kernel(config, full_tree, tmp_path, mounted, capsysbinary, stats):
    image = tmp_path / "img.erofs"
    blob = tmp_path / "blob"
    args = [a.format(blob=blob) for a in CONFIGS[config]]
    mkfs(image, full_tree, *args)
    devices = [blob] if any(a.startswith("--blobdev") for a in args) else []
    mnt = mounted(image, devices)
    kernel = records.kernel_records(mnt)
    kstatfs = records.kernel_statfs(mnt)

    # (b) the Image API, field by field, against the kernel
    img, readers = records.open_image(image, devices)
    try:
        ranges_bad = _compare_ranges(img, mnt, kernel, config)
        ours = records.image_records(img)
        bad = records.diff(kernel, ours)
        bad += records.dirent_checks(img)
        assert img.statfs() | kstatfs == img.statfs(), f"statfs: kernel {kstatfs}, ours {img.statfs()}"
        for path, ex in list(kernel[1].items())[:400]:
            if img.st_ino(img.resolve(path)) != ex["ino"]:
                bad.append(f"{path}: resolve() gives {img.resolve(path)}, kernel st_ino {ex['ino']}")
    finally:
        for r in readers:
            r.close()
    assert not bad, f"{config}: {len(bad)} mismatches, first: {bad[:12]}"
    assert not ranges_bad, f"{config}: {len(ranges_bad)} byte ranges differ, first: {ranges_bad[:8]}"

    # (a) extract, compared with our own corpus comparison
    dest = tmp_path / "out"
    cli = ["extract"] + [x for d in devices for x in ("--device", str(d))] + [str(image), str(dest)]
    rc = main(cli)
    err = capsysbinary.readouterr().err.decode("utf-8", "replace")
    assert rc == 0, err[-3000:]
    bad = corpuslib.compare_tree({"entries": kernel[0]}, dest, dir_size=False, dir_nlink=False)
    assert not bad, f"{config} extract: {len(bad)} mismatches, first: {bad[:12]}"
    stats["images"] += 1
    stats["paths"] += len(kernel[0])
    assert len(kernel[0]) > 500
    assert os.listdir(tmp_path)
