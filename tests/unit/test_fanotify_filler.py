"""The fanotify filler narrowing a window whose read failed its integrity check (a tar layer over
its verified blob: the source has no read_partial) down to the 4 KiB pieces that fail: a fake
source that fails every read touching a damaged range, the real blob cache file as the store."""

from __future__ import annotations

import hashlib

import pytest
import trio

from erofs_mount.backends.fanotify.filler import Filler
from erofs_mount.errors import IntegrityError
from erofs_mount.sources.diskcache import DiskCache

MiB = 1 << 20
SIZE = 3 * MiB + 5000          # the last window is short and ends inside a piece


class Damaged:
    """Bytes i*7 % 251; a read touching a damaged [lo, hi) fails (``transient``: only the first time)."""

    def __init__(self, damaged, *, transient: bool = False) -> None:
        self.size = SIZE
        self.damaged = damaged
        self.transient = transient
        self.reads = 0

    def byte_range(self, lo: int, hi: int) -> bytes:
        return bytes((i * 7) % 251 for i in range(lo, hi))

    async def read_at(self, offset: int, length: int) -> bytes:
        self.reads += 1
        end = min(offset + length, self.size)
        for lo, hi in self.damaged:
            if offset < hi and lo < end:
                if self.transient:
                    self.damaged = []
                raise IntegrityError(f"bytes {lo}-{hi} do not verify")
        return self.byte_range(offset, end)


def run(src: Damaged, tmp_path, ranges):
    """(the outcome of ensure() for each range: None or the exception, the store's bytes or None
    per 4 KiB piece)."""
    store = DiskCache.open(str(tmp_path), "sha256:" + hashlib.sha256(b"x").hexdigest(), SIZE)

    async def main():
        f = Filler(src, store, window=MiB, readahead=0)
        out = []
        for a, b in ranges:
            try:
                await f.ensure(a, b)
                out.append(None)
            except IntegrityError as exc:
                out.append(exc)
        return out, f

    try:
        outcome, f = trio.run(main)
        pieces = [store.read(p, min(p + 4096, SIZE)) if store.has(p, min(p + 4096, SIZE)) else None
                  for p in range(0, SIZE, 4096)]
        return outcome, pieces, f
    finally:
        store.close()


@pytest.mark.parametrize("at", [0, 4096 * 100 + 17, MiB - 1, MiB, 2 * MiB + 4096 * 255, 3 * MiB + 4100])
def test_one_damaged_block_leaves_exactly_its_piece_a_hole(tmp_path, at):
    src = Damaged([(at, at + 1)])
    w = at // MiB
    start, end = w * MiB, min((w + 1) * MiB, SIZE)
    outcome, pieces, f = run(src, tmp_path, [(start, end)])
    assert isinstance(outcome[0], IntegrityError)
    hole = at // 4096
    for p in range(start // 4096, (end + 4095) // 4096):
        lo, hi = p * 4096, min(p * 4096 + 4096, SIZE)
        assert (pieces[p] is None) == (p == hole), p
        if p != hole:
            assert pieces[p] == src.byte_range(lo, hi)
    assert src.reads <= 2 + 2 * 8 and f.stats["unverified_blocks"] == 1
    # a fill that needs the hole fails, one that does not succeeds (the window is read again)
    other = start if hole != start // 4096 else start + 4096
    outcome, _, _ = run(Damaged([(at, at + 1)]), tmp_path / "again", [(at, at + 1), (other, other + 10)])
    assert isinstance(outcome[0], IntegrityError) and outcome[1] is None


def test_damage_across_a_midpoint_leaves_just_its_pieces_a_hole(tmp_path):
    src = Damaged([(MiB // 2 - 2048, MiB // 2 + 2048)])   # a blob block straddling two image pieces
    outcome, pieces, f = run(src, tmp_path, [(0, 1)])
    assert outcome == [None]
    holes = [p for p in range(MiB // 4096) if pieces[p] is None]
    assert holes == [MiB // 2 // 4096 - 1, MiB // 2 // 4096] and src.reads <= 2 + 2 * 8


def test_damage_in_two_places_leaves_the_pieces_from_the_first_to_the_last_a_hole(tmp_path):
    src = Damaged([(10, 11), (MiB - 10, MiB - 9)])       # (a gzip span spoiled whole looks the same)
    outcome, pieces, f = run(src, tmp_path, [(MiB // 2, MiB // 2 + 1)])
    assert isinstance(outcome[0], IntegrityError)
    assert all(p is None for p in pieces[:MiB // 4096]) and src.reads <= 2 + 2 * 8


def test_a_failure_that_goes_away_writes_the_whole_window(tmp_path):
    src = Damaged([(MiB // 3, MiB // 3 + 1)], transient=True)
    outcome, pieces, f = run(src, tmp_path, [(0, 100)])
    assert outcome == [None] and all(p is not None for p in pieces[:MiB // 4096])
    assert f.stats["unverified_blocks"] == 0
