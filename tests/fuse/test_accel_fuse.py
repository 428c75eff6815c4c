"""The accelerators (backends/fuse/accel) never change a result: every valid corpus image is mounted
with ``-o accel=none`` (the plain request path: worker threads, no page-cache stores, no decoder
process, no polling, trio's own lock, the kernel's read-ahead) and with every accelerator on, and
the two trees must agree in every byte and field — with each other and with the kernel's manifest.
Beside the whole-file reads of the scan, every regular file is also read at fixed pseudo-random
offsets and sizes (page-straddling, past the end) on both mounts.

The logs prove each run really took its path: ``accelerators: none`` / ``all``, and with all on
some small files went into the page cache at OPEN (none with accel=none); on a compressed image with
2 or more CPUs the decoder process runs only with accel=all (its answers for every codec are checked
one by one in test_decoder.py).
"""

from __future__ import annotations

import os
import random
import re

import pytest

from tests import corpuslib

from .conftest import decoder_pids, is_live, zdata_available

VALID = corpuslib.names(expect="ok")
SIZES = (1, 4095, 4097, 65536 + 3, 300_000)


def _reads(root: str, entries: dict) -> dict[str, str]:
    """For every regular file: bytes at deterministic offsets (hex of a short digest per read)."""
    import hashlib

    out = {}
    for path, rec in sorted(entries.items()):
        if rec.get("type") != "file" or "error" in rec:
            continue
        size = rec["size"]
        rnd = random.Random(f"{path}:{size}")
        full = os.path.join(root, path.lstrip("/"))
        fd = os.open(full, os.O_RDONLY)
        try:
            h = hashlib.sha256()
            for length in SIZES:
                off = rnd.randrange(0, size + 2) if size else 0
                data = os.pread(fd, length, off)
                h.update(f"{off}:{len(data)}:".encode() + data)
            out[path] = h.hexdigest()
        finally:
            os.close(fd)
    return out


def _log_since(path: str, offset: int) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        f.seek(offset)
        return f.read()


def _serve(fuse, img, accel: str, mnt: str) -> tuple[dict, dict, str, bool, list]:
    at = os.path.getsize(fuse.log_file) if os.path.exists(fuse.log_file) else 0
    res = fuse.mount(img.path, mnt, devices=img.devices, opts=(f"accel={accel}",))
    assert res.returncode == 0, res.stderr
    assert is_live(mnt)
    decoding = bool(decoder_pids(mnt))
    tree = corpuslib.scan_tree(mnt)
    reads = _reads(mnt, tree)
    wrong = corpuslib.compare_tree(corpuslib.load_manifest(img.manifest), mnt)
    assert fuse.unmount(mnt).returncode == 0
    return tree, reads, _log_since(fuse.log_file, at), decoding, wrong


@pytest.mark.parametrize("name", VALID)
def test_accelerators_never_change_results(name, fuse):
    img = corpuslib.image(name)
    if img.compressed and not zdata_available():
        pytest.xfail("compressed data support not present")
    plain = _serve(fuse, img, "none", fuse.mountpoint("plain"))
    fast = _serve(fuse, img, "all", fuse.mountpoint("fast"))
    assert plain[0] == fast[0], "the trees differ between accel=none and accel=all"
    assert plain[1] == fast[1], "positional reads differ between accel=none and accel=all"
    assert not plain[4], f"{len(plain[4])} mismatches with the kernel's manifest, first: {plain[4][:5]}"

    assert "accelerators: none" in plain[2] and "accelerators: all" in fast[2]
    stored = [int(m) for m in re.findall(r"page cache: (\d+) small files stored", plain[2] + "\n" + fast[2])]
    assert len(stored) == 2, (plain[2][-2000:], fast[2][-2000:])
    assert stored[0] == 0, "accel=none stored files in the page cache"
    small = [r for r in fast[0].values() if r.get("type") == "file" and 0 < r["size"] <= 128 * 1024]
    if small:
        assert stored[1] > 0, "accel=all stored no file in the page cache"
    assert not plain[3], "accel=none started a decoder process"
    if img.compressed and len(os.sched_getaffinity(0)) >= 2 and not img.devices:
        assert fast[3], "accel=all ran no decoder process on a compressed image"
