"""Which file the store-ahead bookkeeping suggests after an OPEN (backends/fuse/accel/storeahead.py)."""

from erofs_mount.backends.fuse.accel.storeahead import StoreAhead


def _ahead(limit=1000):
    calls = []
    return StoreAhead(lambda ino, size: calls.append((ino, size)), limit=limit), calls


def test_opening_a_file_suggests_the_next_regular_file_listed_in_its_directory():
    a, calls = _ahead()
    for ino, size in [(10, 1), (11, 2), (12, 3)]:
        a.listed(1, ino, size)
    a.opened(10)
    assert a.pending == (11, 2)
    a.opened(11)                      # a newer OPEN replaces an unused suggestion
    assert a.pending == (12, 3)
    a.run()
    assert calls == [(12, 3)] and a.pending is None
    a.run()                           # nothing pending: nothing stored
    assert calls == [(12, 3)]


def test_the_last_file_and_unlisted_files_suggest_nothing():
    a, _ = _ahead()
    a.listed(1, 10, 1)
    a.listed(1, 11, 1)
    a.opened(11)
    assert a.pending is None
    a.opened(99)
    assert a.pending is None


def test_directories_keep_their_own_order_and_a_new_listing_starts_afresh():
    a, _ = _ahead()
    a.listed(1, 10, 1)
    a.listed(2, 20, 1)                # listings of two directories interleave
    a.listed(1, 11, 1)
    a.listed(2, 21, 1)
    a.opened(10)
    assert a.pending == (11, 1)
    a.opened(20)
    assert a.pending == (21, 1)
    a.listing_starts(1)               # rewinddir: the first entry is not the successor of the last
    a.listed(1, 10, 1)
    a.opened(11)
    assert a.pending is None


def test_memory_is_bounded():
    a, _ = _ahead(limit=100)
    for d in range(300):
        for i in range(3):
            a.listed(d, d * 10 + i, 1)
    assert len(a._next) <= 100 and len(a._last) <= 100
    a.opened(2990)                    # the newest listing is still known
    assert a.pending == (2991, 1)
