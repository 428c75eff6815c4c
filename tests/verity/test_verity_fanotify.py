"""fanotify mode with dm-verity: every window is checked before it is written to the sparse file the
kernel reads; a damaged block stays a hole (EIO for the file that needs it, the rest of its window
is written and served)."""

from __future__ import annotations

import errno
import os
import re
import signal

from erofs_mount.backends.fanotify import record
from erofs_mount.sources.diskcache import DiskCache
from tests import corpuslib
from tests.fanotify.conftest import cli, fan  # noqa: F401 - the fixture
from tests.kernel.helpers import wait_until
from tests.verity.conftest import file_offset, format_copy
from tests.verity.test_verity_fuse import manifest, only_damaged, read_errno


def _status_verity(mnt: str, env: dict) -> tuple[int, int]:
    out = cli("status", env=env).stdout
    line = next(ln for ln in out.splitlines() if f" {mnt} " in ln)
    m = re.search(r"verity=verified:(\d+),failed:(\d+)", line)
    assert m, line
    return int(m.group(1)), int(m.group(2))


def test_local_image_verified_into_the_sparse_file(tmp_path, fan):  # noqa: F811
    f = format_copy("lz4", tmp_path)
    res, mnt = fan.mount(str(f.path), f"verity.roothash={f.root}")
    assert res.returncode == 0, res.stderr
    assert corpuslib.compare_tree(manifest("lz4"), mnt) == []
    import time

    time.sleep(1.5)  # the record's figures are rewritten every second
    verified, failed = _status_verity(mnt, fan.env)
    assert verified > 0 and failed == 0
    assert fan.unmount(mnt).returncode == 0


def test_status_counts_verified_blocks_since_the_mount_across_a_reattach(tmp_path, fan):  # noqa: F811
    """A daemon SIGKILLed and replaced by --reattach: status still counts the blocks its predecessor
    verified (the record carries them), not only the new daemon's."""
    f = format_copy("lz4", tmp_path)
    res, mnt = fan.mount(str(f.path), f"verity.roothash={f.root}")
    assert res.returncode == 0, res.stderr
    assert corpuslib.compare_tree(manifest("lz4"), mnt) == []
    wait_until(lambda: _status_verity(mnt, fan.env)[0] > 0, 15, "the daemon to publish its counts")
    before = _status_verity(mnt, fan.env)
    daemon = fan.doc(mnt)["pids"]["daemon"]
    os.kill(daemon, signal.SIGKILL)
    wait_until(lambda: not record.alive(daemon), 15, "the daemon to die")
    r = cli("--reattach", mnt, env=fan.env)
    assert r.returncode == 0, r.stderr
    wait_until(lambda: fan.doc(mnt).get("daemons") == 2, 15, "the new daemon to publish")
    verified, failed = _status_verity(mnt, fan.env)
    assert failed == before[1] == 0
    # every byte was local: the new daemon checked little (the superblock's block at open)
    assert before[0] <= verified <= before[0] + 64, (before, verified)
    assert corpuslib.compare_tree(manifest("lz4"), mnt) == []
    assert fan.unmount(mnt).returncode == 0


def test_local_flipped_byte_stays_a_hole(tmp_path, fan):  # noqa: F811
    f = format_copy("plain-inline-4k", tmp_path)
    m = manifest("plain-inline-4k")
    path, at = file_offset(f.raw, m)
    data = bytearray(f.raw)
    data[at] ^= 0x02
    f.path.write_bytes(bytes(data))
    res, mnt = fan.mount(str(f.path), f"verity.roothash={f.root}")
    assert res.returncode == 0, res.stderr
    assert read_errno(mnt + path) == errno.EIO
    assert only_damaged(corpuslib.compare_tree(m, mnt), path) == []
    doc = fan.doc(mnt)
    store = DiskCache.open(fan.cache, doc["key"], doc["size"])
    try:
        blk = at // 4096 * 4096
        assert not store.has(blk, blk + 4096)          # never written
        assert store.has(blk + 4096, blk + 8192) or store.has(blk - 4096, blk)  # its window's others were
    finally:
        store.close()
    assert fan.unmount(mnt).returncode == 0


def test_a_wrong_root_hash_fails_with_one_line(tmp_path, fan):  # noqa: F811
    f = format_copy("plain-inline-4k", tmp_path)
    res, mnt = fan.mount(str(f.path), f"verity.roothash={'0' * 64}")
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "root hash" in lines[0], lines


def test_registry_layer_with_a_damaged_blob(vworld, tmp_path, fan):  # noqa: F811
    f = vworld.images["plain-inline-4k"]
    m = manifest("plain-inline-4k")
    opts = "oci.layer=0,oci.insecure"
    res, mnt = fan.mount(vworld.ref("plain-inline-4k"), opts)
    assert res.returncode == 0, res.stderr
    assert corpuslib.compare_tree(m, mnt) == []
    assert fan.unmount(mnt).returncode == 0
    path, at = file_offset(f.raw, m)
    blob = vworld.blob_file(f.digest)
    damaged = bytearray(f.raw)
    damaged[at] ^= 0x10
    blob.write_bytes(bytes(damaged))
    try:
        fan.cache = tmp_path / "cache2"   # a cold sparse file
        fan.cache.mkdir()
        fan.env["EROFS_MOUNT_CACHE_DIR"] = str(fan.cache)
        res, mnt = fan.mount(vworld.ref("plain-inline-4k"), opts)
        assert res.returncode == 0, res.stderr
        assert read_errno(mnt + path) == errno.EIO
        assert only_damaged(corpuslib.compare_tree(m, mnt), path) == []
        assert fan.unmount(mnt).returncode == 0
    finally:
        blob.write_bytes(f.raw)
