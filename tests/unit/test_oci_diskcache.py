"""The persistent blob cache on a real filesystem (tmp_path)."""

import hashlib
import os

import pytest

from erofs_mount.sources import diskcache as dc


def digest(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
def blob():
    return os.urandom(5 * dc.BLOCK + 100)  # last block short


def test_fill_verify_reopen(tmp_path, blob):
    d = digest(blob)
    c = dc.DiskCache.open(str(tmp_path), d, len(blob))
    assert not c.has(0, 10) and not c.complete
    c.write(0, blob[:2 * dc.BLOCK])
    assert c.has(0, 2 * dc.BLOCK) and not c.has(0, 2 * dc.BLOCK + 1)
    assert c.read(100, 5000) == blob[100:5000]
    c.write(2 * dc.BLOCK, blob[2 * dc.BLOCK:])  # the tail, short last block
    assert c.complete and not c.verified
    assert c.verify() and c.verified
    c.close()
    again = dc.DiskCache.open(str(tmp_path), d, len(blob))
    assert again.verified and again.complete and again.read(0, len(blob)) == blob
    again.close()
    assert os.stat(os.path.join(str(tmp_path), "sha256", d[7:], "data")).st_size == len(blob)


def test_unaligned_write_refused(tmp_path, blob):
    c = dc.DiskCache.open(str(tmp_path), digest(blob), len(blob))
    with pytest.raises(ValueError):
        c.write(100, blob[100:200])
    with pytest.raises(ValueError):
        c.write(0, blob[:dc.BLOCK + 1])
    c.close()


def test_mismatch_discarded(tmp_path, blob):
    bad = bytearray(blob)
    bad[7] ^= 1
    c = dc.DiskCache.open(str(tmp_path), digest(blob), len(blob))
    c.write(0, bytes(bad))
    assert c.complete and not c.verify()
    assert not c.has(0, 1) and not c.complete
    c.close()
    c = dc.DiskCache.open(str(tmp_path), digest(blob), len(blob))
    assert not c.has(0, 1)
    c.close()


def test_two_mounts_share_bits(tmp_path, blob):
    d = digest(blob)
    a = dc.DiskCache.open(str(tmp_path), d, len(blob))
    b = dc.DiskCache.open(str(tmp_path), d, len(blob))
    a.write(0, blob[:dc.BLOCK])
    b.write(dc.BLOCK, blob[dc.BLOCK:2 * dc.BLOCK])  # must not clear a's bit
    assert b.has(0, dc.BLOCK)  # refreshed from the map file
    a2 = dc.DiskCache.open(str(tmp_path), d, len(blob))
    assert a2.has(0, 2 * dc.BLOCK) and a2.read(0, 2 * dc.BLOCK) == blob[:2 * dc.BLOCK]
    for c in (a, b, a2):
        c.close()


def test_size_change_reinitialises(tmp_path, blob):
    d = digest(blob)
    c = dc.DiskCache.open(str(tmp_path), d, len(blob))
    c.write(0, blob[:dc.BLOCK])
    c.close()
    c = dc.DiskCache.open(str(tmp_path), d, len(blob) - 1)  # a lie about the size: start over
    assert not c.has(0, 1)
    c.close()


def test_enforce_limit_skips_entries_in_use(tmp_path):
    root = str(tmp_path)
    entries = []
    for k in range(3):
        data = bytes([k]) * (64 * dc.BLOCK)
        c = dc.DiskCache.open(root, digest(data), len(data))
        c.write(0, data)
        os.utime(os.path.join(c.path, "map"), (1000 + k, 1000 + k))  # k=0 is the oldest
        entries.append(c)
    entries[0].close()
    entries[2].close()
    total = sum(u for _, u, _ in dc.usage(root))
    freed = dc.enforce_limit(root, total - 1)
    left = {p for _, _, p in dc.usage(root)}
    assert freed > 0 and entries[0].path not in left and entries[1].path in left and entries[2].path in left
    dc.enforce_limit(root, 0)  # everything unused goes; the open entry stays
    assert {p for _, _, p in dc.usage(root)} == {entries[1].path}
    entries[1].close()


def test_default_root(monkeypatch, tmp_path):
    if os.geteuid() == 0:
        assert dc.default_root() == "/var/cache/erofs-mount/blobs"
    else:
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
        assert dc.default_root() == str(tmp_path / "erofs-mount" / "blobs")


def test_all_set_agrees_with_the_bits_one_by_one():
    """``all_set`` (whole bytes at once) against the plain definition, for bitmaps with one bit
    clear anywhere and ranges starting and ending at every bit position of a byte."""
    import random

    rng = random.Random(5)
    full = bytearray(b"\xff" * 12)
    cases = [full] + [bytearray(full) for _ in range(30)]
    for bm in cases[1:]:
        i = rng.randrange(96)
        bm[i >> 3] &= ~(1 << (i & 7)) & 0xFF
    cases.append(bytearray(rng.randbytes(12)))
    for bm in cases:
        for first in range(0, 40):
            for stop in range(first, 96, 3):
                want = all(bm[i >> 3] & (1 << (i & 7)) for i in range(first, stop))
                assert dc.all_set(bm, first, stop) == want, (bytes(bm).hex(), first, stop)
