"""48-bit extent records (erofs/zext.py): the pa of 4-byte records by prefix sums, in any order."""

import random
import struct
from types import SimpleNamespace

import pytest

from erofs_mount.erofs import zext


def _owner(plens, base):
    """A ZMap stand-in: 4-byte records after a le64 base at ext_pos; counts the index bytes read."""
    ext_pos = 64
    meta = bytes(ext_pos) + struct.pack("<Q", base) + struct.pack(f"<{len(plens)}I", *plens)
    read = [0]

    def _meta(pos, n):
        read[0] += n
        assert pos + n <= len(meta)
        return meta[pos:pos + n]

    return SimpleNamespace(_meta=_meta, ext_pos=ext_pos, recsz=4), read


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_pa_of_equals_the_prefix_sum_in_any_order(seed):
    rnd = random.Random(seed)
    n = 3 * zext.PA_CHUNK + 77
    # high bits (algorithm, partial flag) must not count into the sum
    plens = [rnd.randrange(1, 1 << 20) | (rnd.randrange(4) << zext.Z_EROFS_EXTENT_PLEN_FMT_BIT)
             for _ in range(n)]
    base = rnd.randrange(1 << 40)
    want = [base]
    for p in plens[:-1]:
        want.append(want[-1] + (p & zext.Z_EROFS_EXTENT_PLEN_MASK))
    owner, _ = _owner(plens, base)
    recs = zext.ExtentRecords(owner)
    order = list(range(n)) + [rnd.randrange(n) for _ in range(2000)] + list(range(n - 1, -1, -1))
    for k in order:
        assert recs.pa_of(k) == want[k], k


def test_sequential_lookups_read_each_record_once():
    n = 4 * zext.PA_CHUNK
    owner, read = _owner([4096] * n, 1 << 20)
    recs = zext.ExtentRecords(owner)
    for k in range(n):
        assert recs.pa_of(k) == (1 << 20) + 4096 * k
    # the base, the checkpoints' chunks once each, then one record per step
    assert read[0] <= 8 + 4 * n + 4 * n
    # a lookup far back in a chunk starts from its checkpoint, not from the previous lookup
    read[0] = 0
    assert recs.pa_of(zext.PA_CHUNK + 3) == (1 << 20) + 4096 * (zext.PA_CHUNK + 3)
    assert read[0] == 3 * 4
