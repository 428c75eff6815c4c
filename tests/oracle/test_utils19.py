"""Images made by mkfs.erofs 1.9.x (tests/data/oracle, see make_utils19_images.py) for features 1.5 cannot make.

Each image comes with the kernel's records taken when it was made (``NAME.json.gz``),
so the Image API comparison runs everywhere, root or not.  Where the host kernel
can serve as the oracle the image is also mounted now and compared live, and
``erofs-mount extract`` is checked against that view.
"""

from __future__ import annotations

import gzip
import os
import json
import shutil
from pathlib import Path

import pytest

from erofs_mount.cli import main
from tests import corpuslib
from tests.oracle import kmount, records

DATA = Path(__file__).resolve().parents[1] / "data" / "oracle"
INDEX = json.loads((DATA / "index.json").read_text()) if (DATA / "index.json").exists() else []


def _materialise(entry: dict, tmp: Path) -> tuple[Path, list[Path]]:
    out = []
    for name in [entry["image"], *entry["devices"]]:
        target = tmp / name
        with gzip.open(DATA / (name + ".gz")) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
        out.append(target)
    return out[0], out[1:]


def _manifest(entry: dict) -> dict:
    with gzip.open(DATA / entry["manifest"]) as f:
        return json.load(f)


def _ours(image: Path, devices: list[Path]) -> tuple[tuple[dict, dict], dict, list[str]]:
    img, readers = records.open_image(image, devices)
    try:
        return records.image_records(img), img.statfs(), records.dirent_checks(img)
    finally:
        for r in readers:
            r.close()


@pytest.mark.parametrize("entry", INDEX, ids=[e["name"] for e in INDEX])
def test_recorded_kernel_view(entry, tmp_path):
    """Our reader against the kernel's records taken at generation time (no privileges needed)."""
    image, devices = _materialise(entry, tmp_path)
    m = _manifest(entry)
    ours, statfs, dirent_bad = _ours(image, devices)
    bad = records.diff((m["entries"], m["extra"]), ours) + dirent_bad
    assert {k: statfs[k] for k in m["statfs"]} == m["statfs"]
    assert not bad, f"{entry['name']}: {len(bad)} mismatches, first: {bad[:12]}"


@pytest.mark.parametrize("entry", INDEX, ids=[e["name"] for e in INDEX])
def test_live_kernel_view_and_extract(entry, tmp_path, mounted, capsysbinary):
    reason = kmount.kernel_unavailable_reason()
    if reason:
        pytest.skip(reason)
    image, devices = _materialise(entry, tmp_path)
    mnt = mounted(image, devices)
    kernel = records.kernel_records(mnt)
    kstatfs = records.kernel_statfs(mnt)
    ours, statfs, _ = _ours(image, devices)
    bad = records.diff(kernel, ours)
    assert {k: statfs[k] for k in kstatfs} == kstatfs
    assert not bad, f"{entry['name']}: {len(bad)} mismatches, first: {bad[:12]}"
    dest = tmp_path / "out"
    rc = main(["extract", *[x for d in devices for x in ("--device", str(d))], str(image), str(dest)])
    err = capsysbinary.readouterr().err.decode("utf-8", "replace")
    assert rc == 0, err[-3000:]
    bad = corpuslib.compare_tree({"entries": kernel[0]}, dest, dir_size=False, dir_nlink=False)
    assert not bad, f"{entry['name']} extract: {len(bad)} mismatches, first: {bad[:12]}"


def test_st_ino_follows_the_kernel_for_big_metabox_nids(tmp_path):
    """erofs_nid_to_ino64: metabox flag (bit 63) -> bit 31, nid bits 31..62 -> 32..63; others unchanged."""
    entry = next((e for e in INDEX if e["name"].startswith("metabox")), None)
    if entry is None:
        pytest.skip("no metabox image in tests/data/oracle")
    image, devices = _materialise(entry, tmp_path)
    img, readers = records.open_image(image, devices)
    try:
        assert img.st_ino((1 << 63) | 5) == (1 << 31) | 5
        assert img.st_ino((1 << 63) | (1 << 40) | (1 << 31) | 7) == (1 << 41) | (1 << 32) | (1 << 31) | 7
        assert img.st_ino(36) == 36
    finally:
        for r in readers:
            r.close()


def test_dot_omitted_directories_list_dot_last_like_the_kernel(tmp_path):
    """The kernel emits "." of a dot-omitted directory after the on-disk entries, at pos i_size."""
    entry = next((e for e in INDEX if e["name"] == "dot-omitted"), None)
    if entry is None:
        pytest.skip("no dot-omitted image in tests/data/oracle")
    image, devices = _materialise(entry, tmp_path)
    img, readers = records.open_image(image, devices)
    try:
        nid = img.resolve("/bigdir")
        inode = img.inode(nid)
        assert inode.dot_omitted
        ents = list(img.iterdir(nid))
        assert [e.name for e in ents].count(b".") == 1
        assert ents[-1].name == b"." and ents[-1].nid == nid and ents[-1].next_pos == inode.size + 1
        assert [e.name for e in img.iterdir(nid, inode.size)] == [b"."]
        assert list(img.iterdir(nid, inode.size + 1)) == []
    finally:
        for r in readers:
            r.close()


def test_huge_sparse_file_past_4gib(tmp_path):
    """6 GiB sparse file, 48-bit chunk indexes: size, st_blocks, st_ino and 64-byte reads as the kernel saw them."""
    meta_path = DATA / "huge-sparse.json"
    if not meta_path.exists():
        pytest.skip("no huge-sparse image in tests/data/oracle")
    meta = json.loads(meta_path.read_text())
    image = tmp_path / "huge.erofs"
    with gzip.open(DATA / "huge-sparse-48bit-chunks.erofs.gz") as src, open(image, "wb") as dst:
        shutil.copyfileobj(src, dst)
    img, readers = records.open_image(image)
    try:
        nid = img.resolve(meta["path"])
        inode = img.inode(nid)
        assert (inode.size, inode.blocks, img.st_ino(nid)) == (meta["st_size"], meta["st_blocks"], meta["st_ino"])
        for off, want in meta["reads64"].items():
            assert img.read(nid, int(off), 64).hex() == want, off
        if not kmount.kernel_unavailable_reason():   # and live, at a few more offsets
            with kmount.kernel_mount(image, tmp_path / "mnt") as mnt:
                with open(mnt + meta["path"], "rb") as f:
                    for off in (1, (4 << 30) - 70, (5 << 30) + 12345, meta["st_size"] - 64):
                        assert img.read(nid, off, 200) == os.pread(f.fileno(), 200, off), off
    finally:
        for r in readers:
            r.close()
