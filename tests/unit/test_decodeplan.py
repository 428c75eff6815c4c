"""DecodePlan: which READs of a stream the decoder process gets, and the slot bookkeeping (pure)."""

from __future__ import annotations

import pytest

from erofs_mount.backends.fuse.accel.decodeplan import MAX_STREAMS, PAGE, DecodePlan

MiB = 1 << 20


def offs(jobs):
    return [j.off // MiB for j in jobs]


def test_a_sequential_stream_leaves_every_third_read_to_the_daemon():
    p = DecodePlan(8)
    assert offs(p.plan(7, 0, MiB, 100 * MiB)) == [1, 2]      # chunk 3 is the daemon's
    assert offs(p.plan(7, MiB, MiB, 100 * MiB)) == [4]       # 2 already asked for
    assert offs(p.plan(7, 2 * MiB, MiB, 100 * MiB)) == [5]
    assert offs(p.plan(7, 3 * MiB, MiB, 100 * MiB)) == []    # 4, 5 asked for; 6 is the daemon's
    assert p.submitted == 4


def test_a_stream_of_reads_off_the_size_grid_is_planned_on_its_own_grid():
    """cat reads 128 KiB at a time: the kernel's read-ahead sends 256 KiB, 512 KiB, then 1 MiB READs
    at 768 KiB + k MiB (measured on 6.18).  Nothing is planned while the window grows; then the
    stream's own grid is used, and the last READ ends at EOF rounded up to a page."""
    K = 1024
    size = 6 * MiB + 1000
    p = DecodePlan(8)
    assert p.plan(7, 0, 256 * K, size) == []
    assert p.plan(7, 256 * K, 512 * K, size) == []          # the window still grows
    assert p.plan(7, 768 * K, MiB, size) == []              # the first READ of this size
    jobs = p.plan(7, 768 * K + MiB, MiB, size)              # steady
    assert [(j.off, j.size) for j in jobs] == [(768 * K + 2 * MiB, MiB), (768 * K + 4 * MiB, MiB)]
    for j in jobs:
        p.finished(j.rid, MiB)
    assert p.take(7, 768 * K + 2 * MiB, MiB) is not None   # the READ the kernel sends next
    jobs = p.plan(7, 768 * K + 2 * MiB, MiB, size)
    last = 768 * K + 5 * MiB
    assert [(j.off, j.size) for j in jobs] == [(last, -(-(size - last) // PAGE) * PAGE)]
    assert jobs[0].size < MiB
    assert p.submitted == 3


def test_random_reads_get_nothing_and_the_file_end_bounds_the_plan():
    p = DecodePlan(8)
    assert p.plan(7, 5 * MiB, MiB, 100 * MiB) == []         # not where a stream goes on
    assert p.plan(7, 9 * MiB, MiB, 100 * MiB) == []
    assert offs(p.plan(7, 10 * MiB, MiB, 100 * MiB)) == [11, 13]  # 9 -> 10 is sequential; 12 is the daemon's
    assert offs(p.plan(8, 0, MiB, 2 * MiB + 1)) == [1, 2]   # the last, short chunk too
    assert p.plan(9, 0, MiB, MiB) == []


def test_results_are_only_for_exactly_their_read_and_lent_slots_come_back():
    p = DecodePlan(2)
    a, b = p.plan(7, 0, MiB, 100 * MiB)
    assert p.in_flight(7, MiB, MiB) == a.rid and p.in_flight(7, MiB, MiB // 2) is None
    p.finished(a.rid, MiB)
    p.finished(b.rid, 123)
    assert p.take(7, MiB, MiB // 2) is None and p.take(8, MiB, MiB) is None
    assert p.take(7, MiB, MiB) == (a.slot, MiB)
    assert p.take(7, MiB, MiB) is None                      # handed out once
    assert p.take(7, 2 * MiB, MiB) == (b.slot, 123)
    assert p.answered == 2
    assert p.plan(7, 2 * MiB, MiB, 100 * MiB) == []          # both slots are lent to replies
    p.release_lent()
    assert offs(p.plan(7, 3 * MiB, MiB, 100 * MiB)) == [4, 5]


def test_a_failed_or_abandoned_read_frees_its_slot_and_gives_no_result():
    p = DecodePlan(2)
    a, b = p.plan(7, 0, MiB, 100 * MiB)
    p.finished(a.rid, None)             # the process could not decode it
    p.abandon(b.rid)                    # the daemon stopped waiting
    p.finished(b.rid, MiB)
    assert p.take(7, MiB, MiB) is None and p.take(7, 2 * MiB, MiB) is None
    assert p.dropped == 2 and p.in_flight(7, MiB, MiB) is None and p.in_flight(7, 2 * MiB, MiB) is None
    assert offs(p.plan(7, MiB, MiB, 100 * MiB)) == [2, 4]   # both slots are free again
    assert p.plan(7, 2 * MiB, MiB, 100 * MiB) == []          # and both in use
    with pytest.raises(ValueError):
        p.finished(999, MiB)


def test_unused_results_are_dropped_behind_the_stream_and_oldest_first():
    p = DecodePlan(2)
    a, b = p.plan(7, 0, MiB, 100 * MiB)
    p.finished(a.rid, MiB)
    p.finished(b.rid, MiB)
    # the reader skipped chunks 1 and 2: their results are behind it and make room
    p.plan(7, 2 * MiB, MiB, 100 * MiB)   # not sequential (0 -> 2): nothing planned, nothing dropped
    assert p.dropped == 0
    jobs = p.plan(7, 3 * MiB, MiB, 100 * MiB)
    assert offs(jobs) == [4, 5] and p.dropped == 2
    for j in jobs:
        p.finished(j.rid, MiB)
    # another file's stream takes the oldest results' slots
    assert offs(p.plan(8, 0, MiB, 100 * MiB)) == [1, 2]
    assert p.dropped == 4 and p.take(7, 4 * MiB, MiB) is None


def test_reset_forgets_everything_and_streams_stay_bounded():
    p = DecodePlan(4)
    jobs = p.plan(7, 0, MiB, 100 * MiB)
    p.finished(jobs[0].rid, MiB)
    p.reset()
    assert p.take(7, MiB, MiB) is None and p.in_flight(7, 2 * MiB, MiB) is None
    assert len(p.plan(7, MiB, MiB, 100 * MiB)) == 2          # all four slots are free again
    for nid in range(1000, 1000 + 3 * MAX_STREAMS):
        p.plan(nid, 5 * MiB, MiB, 100 * MiB)
    assert len(p._next) == MAX_STREAMS


def test_bad_arguments():
    with pytest.raises(ValueError):
        DecodePlan(0)
    with pytest.raises(ValueError):
        DecodePlan(4, every=1)
