"""FUSE inode numbers <-> nids (backends/fuse/inodes.py)."""

import errno
import random

import pytest

from erofs_mount.backends.fuse.inodes import FUSE_ROOT_ID, InodeNumbers
from erofs_mount.errors import StaleError


@pytest.mark.parametrize("metabox", [False, True])
def test_round_trip_and_no_collision_with_the_root(metabox):
    nums = InodeNumbers(root_nid=36, metabox=metabox)
    assert nums.ino_of(36) == FUSE_ROOT_ID and nums.nid_of(FUSE_ROOT_ID) == 36
    rnd = random.Random(1)
    nids = [0, 1, 2, 35, 37, (1 << 31) - 1, 1 << 31, (1 << 62) + 5]
    if metabox:
        nids += [(1 << 63) | 7, (1 << 63) | (1 << 40)]
    nids += [rnd.randrange(2, 1 << 40) for _ in range(1000)]
    seen = set()
    for nid in nids:
        ino = nums.ino_of(nid)
        assert ino != FUSE_ROOT_ID and ino not in seen
        seen.add(ino)
        assert nums.nid_of(ino) == nid
    assert nums.ino_of(0) == (1 << 64) - 1 and nums.ino_of(1) == (1 << 64) - 2
    if metabox:   # erofs_nid_to_ino64: the metabox flag lands in bit 31
        assert nums.ino_of((1 << 63) | 7) == (1 << 31) | 7


def test_an_unmapped_number_is_estale():
    with pytest.raises(StaleError) as exc:
        InodeNumbers(root_nid=36, metabox=False).nid_of(0)
    assert exc.value.errno == errno.ESTALE
