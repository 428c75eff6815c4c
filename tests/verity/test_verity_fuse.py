"""FUSE mode with dm-verity: a real registry (damaged storage, a corrupting proxy), the real kernel's FUSE,
the full corpus comparison; zero wrong bytes, EIO only where a block is damaged."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import pytest

from erofs_mount.sources.diskcache import DiskCache
from tests import corpuslib
from tests.conftest import run_cli
from tests.fuse.conftest import cli_mounts
from tests.oci._faultproxy import Fault
from tests.verity.conftest import file_offset, format_copy

FUSE_LOG = Path("/var/log/erofs-mount/fuse.log") if os.geteuid() == 0 else None


@pytest.fixture
def mounts(tmp_path):
    yield from cli_mounts(tmp_path)


class LogTail:
    """What the FUSE daemons log from now on (root: /var/log/erofs-mount/fuse.log)."""

    def __init__(self) -> None:
        self.start = FUSE_LOG.stat().st_size if FUSE_LOG and FUSE_LOG.exists() else 0

    def text(self) -> str:
        if not FUSE_LOG or not FUSE_LOG.exists():
            return ""
        with open(FUSE_LOG, "rb") as f:
            f.seek(self.start)
            return f.read().decode("utf-8", "replace")


def manifest(name: str) -> dict:
    return corpuslib.load_manifest(corpuslib.image(name).manifest)


def only_damaged(bad: list[str], path: str) -> list[str]:
    """The mismatches that are not the damaged file's EIO."""
    return [b for b in bad if not (b.startswith(path + " ") and "EIO" in b)]


def status_verity(mnt: str) -> tuple[int, int]:
    out = run_cli("status").stdout.decode()
    line = next(ln for ln in out.splitlines() if f" {mnt} " in ln)
    m = re.search(r"verity=verified:(\d+),failed:(\d+)", line)
    assert m, line
    return int(m.group(1)), int(m.group(2))


read_errno = corpuslib.read_errno


def test_local_image_with_its_tree_passes_the_full_comparison(tmp_path, mounts):
    f = format_copy("lz4", tmp_path)
    mnt = mounts.mountpoint()
    res = run_cli("--mode", "fuse", "-o", f"verity.roothash={f.root}", str(f.path), mnt)
    assert res.returncode == 0, res.stderr
    assert corpuslib.compare_tree(manifest("lz4"), mnt) == []
    import time

    time.sleep(1.5)  # the status document is rewritten every second
    verified, failed = status_verity(mnt)
    assert verified > 0 and failed == 0


def test_local_flipped_byte_fails_only_its_block(tmp_path, mounts):
    f = format_copy("plain-inline-4k", tmp_path)
    m = manifest("plain-inline-4k")
    path, at = file_offset(f.raw, m)
    data = bytearray(f.raw)
    data[at] ^= 0x40
    f.path.write_bytes(bytes(data))
    mnt = mounts.mountpoint()
    log = LogTail()
    res = run_cli("--mode", "fuse", "-o", f"verity.roothash={f.root}", str(f.path), mnt)
    assert res.returncode == 0, res.stderr
    assert read_errno(mnt + path) == errno.EIO
    assert only_damaged(corpuslib.compare_tree(m, mnt), path) == []
    if FUSE_LOG:
        assert f"data block {at // 4096} " in log.text()


def test_a_wrong_root_hash_fails_the_mount_with_one_line(tmp_path, mounts):
    f = format_copy("plain-inline-4k", tmp_path)
    wrong = ("0" if f.root[0] != "0" else "1") + f.root[1:]
    mnt = mounts.mountpoint()
    res = run_cli("--mode", "fuse", "-o", f"verity.roothash={wrong}", str(f.path), mnt)
    assert res.returncode != 0
    err = res.stderr.decode().strip()
    assert len(err.splitlines()) == 1 and "root hash" in err, err
    assert not os.path.ismount(mnt)
    # and an image without a tree
    plain = tmp_path / "plain.erofs"
    plain.write_bytes(f.raw[:f.offset])
    res = run_cli("--mode", "fuse", "-o", f"verity.roothash={f.root}", str(plain), mnt)
    assert res.returncode != 0 and "verity-format" in res.stderr.decode()


def _oci(cache: Path | None, extra: str = "") -> str:
    return "oci.layer=0,oci.insecure," + (f"oci.cache={cache}" if cache else "oci.cache=none") + extra


def test_registry_layer_pinned_by_digest_is_verified_by_its_annotation(vworld, tmp_path, mounts):
    for name in ("plain-inline-4k", "lz4"):
        mnt = mounts.mountpoint(name)
        res = run_cli("--mode", "fuse", "-o", _oci(tmp_path / "c"), vworld.ref(name), mnt, timeout=120)
        assert res.returncode == 0, res.stderr
        assert corpuslib.compare_tree(manifest(name), mnt) == []
        import time

        time.sleep(1.5)
        verified, failed = status_verity(mnt)
        assert verified > 0 and failed == 0


def test_registry_flipped_byte_in_storage_reaches_no_reader_and_no_cache(vworld, tmp_path, mounts):
    f = vworld.images["plain-inline-4k"]
    m = manifest("plain-inline-4k")
    path, at = file_offset(f.raw, m)
    blob = vworld.blob_file(f.digest)
    original = blob.read_bytes()
    assert original == f.raw
    damaged = bytearray(original)
    damaged[at] ^= 0x08
    blob.write_bytes(bytes(damaged))  # docker-registry serves it unchanged, digest header and all
    cache = tmp_path / "c"
    log = LogTail()
    try:
        mnt = mounts.mountpoint()
        res = run_cli("--mode", "fuse", "-o", _oci(cache), vworld.ref("plain-inline-4k"), mnt, timeout=120)
        assert res.returncode == 0, res.stderr
        assert read_errno(mnt + path) == errno.EIO
        assert only_damaged(corpuslib.compare_tree(m, mnt), path) == []
        run_cli("-u", mnt, timeout=60)
        # nothing unverified entered the persistent cache: the damaged block is not there, every block
        # that is holds the image's own bytes
        dc = DiskCache.open(str(cache), f.digest, len(f.raw))
        try:
            assert not dc.has(at // 4096 * 4096, at // 4096 * 4096 + 4096)
            for blk in range(0, f.offset // 4096):
                if dc.has(blk * 4096, blk * 4096 + 4096):
                    assert dc.read(blk * 4096, blk * 4096 + 4096) == f.raw[blk * 4096:blk * 4096 + 4096], blk
        finally:
            dc.close()
        if FUSE_LOG:
            assert f"data block {at // 4096} " in log.text()
    finally:
        blob.write_bytes(original)


def test_a_body_corrupted_once_in_transit_is_refetched(vworld, proxy, tmp_path, mounts):
    f = vworld.images["plain-inline-4k"]
    m = manifest("plain-inline-4k")
    path, at = file_offset(f.raw, m)
    proxy.always = Fault("corrupt", offset=at, times=1)
    mnt = mounts.mountpoint()
    res = run_cli("--mode", "fuse", "-o", _oci(None), vworld.ref("plain-inline-4k", host=proxy.host), mnt, timeout=120)
    assert res.returncode == 0, res.stderr
    assert corpuslib.compare_tree(m, mnt) == []  # the second fetch brought the right bytes
    assert proxy.corrupted == 1


def test_a_body_always_corrupted_in_transit_gives_eio_for_that_block_only(vworld, proxy, tmp_path, mounts):
    f = vworld.images["plain-inline-4k"]
    m = manifest("plain-inline-4k")
    path, at = file_offset(f.raw, m)
    proxy.always = Fault("corrupt", offset=at)
    mnt = mounts.mountpoint()
    res = run_cli("--mode", "fuse", "-o", _oci(tmp_path / "c"), vworld.ref("plain-inline-4k", host=proxy.host), mnt,
                  timeout=120)
    assert res.returncode == 0, res.stderr
    assert read_errno(mnt + path) == errno.EIO
    assert only_damaged(corpuslib.compare_tree(m, mnt), path) == []
    assert proxy.corrupted >= 2  # the first fetch and the refetch


def test_an_annotation_reached_through_a_tag_is_not_trusted(vworld, tmp_path, mounts):
    ref = vworld.ref("plain-inline-4k", pinned=False)
    mnt = mounts.mountpoint()
    res = run_cli("--mode", "fuse", "-o", _oci(None, ",verity=require"), ref, mnt, timeout=120)
    assert res.returncode != 0
    err = res.stderr.decode().strip().splitlines()
    assert len([ln for ln in err if "not trusted" in ln]) == 1, err
    # auto: mounts unverified (and says so in the log); the root hash on the command line is trusted
    res = run_cli("--mode", "fuse", "-o", _oci(None), ref, mnt, timeout=120)
    assert res.returncode == 0, res.stderr
    run_cli("-u", mnt, timeout=60)
    root = vworld.images["plain-inline-4k"].root
    res = run_cli("--mode", "fuse", "-o", _oci(None, f",verity.roothash={root}"), ref, mnt, timeout=120)
    assert res.returncode == 0, res.stderr
    assert corpuslib.compare_tree(manifest("plain-inline-4k"), mnt) == []


def test_a_cache_filled_unverified_is_checked_and_repaired_from_the_registry(vworld, tmp_path, mounts):
    f = vworld.images["plain-inline-4k"]
    m = manifest("plain-inline-4k")
    path, at = file_offset(f.raw, m)
    blob = vworld.blob_file(f.digest)
    damaged = bytearray(f.raw)
    damaged[at] ^= 0x04
    cache = tmp_path / "c"
    blob.write_bytes(bytes(damaged))
    try:  # an unverified mount fills the cache with the damaged block (and serves it: that is verity=off)
        mnt = mounts.mountpoint("off")
        res = run_cli("--mode", "fuse", "-o", _oci(cache, ",verity=off"), vworld.ref("plain-inline-4k"), mnt,
                      timeout=120)
        assert res.returncode == 0, res.stderr
        with open(mnt + path, "rb") as fh:
            fh.read()
        run_cli("-u", mnt, timeout=60)
    finally:
        blob.write_bytes(f.raw)
    dc = DiskCache.open(str(cache), f.digest, len(f.raw))
    blk = at // 4096 * 4096
    try:
        assert dc.has(blk, blk + 4096) and dc.read(blk, blk + 4096) != f.raw[blk:blk + 4096]
    finally:
        dc.close()
    # the verified mount hashes what it finds unmarked, forgets the bad block and fetches it again
    mnt = mounts.mountpoint("on")
    res = run_cli("--mode", "fuse", "-o", _oci(cache), vworld.ref("plain-inline-4k"), mnt, timeout=120)
    assert res.returncode == 0, res.stderr
    assert corpuslib.compare_tree(m, mnt) == []
    run_cli("-u", mnt, timeout=60)
    dc = DiskCache.open(str(cache), f.digest, len(f.raw))
    try:   # (the entry may have been emptied: complete, it did not match the blob digest then)
        dc.use_marks(f.root)
        for b in range(0, len(f.raw), 4096):   # every block marked verified holds the image's bytes
            if dc.marked(b, b + 4096):
                assert dc.read(b, b + 4096) == f.raw[b:b + 4096], b
    finally:
        dc.close()
