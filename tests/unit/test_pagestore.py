"""Which opens store a file in the kernel's page cache (backends/fuse/accel/pagestore.py), with a fake notify."""

import errno

from erofs_mount.backends.fuse.accel import pagestore


def _store(max_size=100):
    calls = []
    return pagestore.PageStore(max_size, notify=lambda ino, off, data: calls.append((ino, off, data))), calls


def test_a_small_unopened_file_is_stored_once():
    ps, calls = _store()
    assert ps.wants(5, 10)
    assert ps.store(5, b"x" * 10)
    assert calls == [(5, 0, b"x" * 10)]
    assert not ps.wants(5, 10)                      # remembered: not read again
    assert (ps.stores, ps.store_bytes) == (1, 10)


def test_sizes_outside_the_window_are_left_to_read():
    ps, _ = _store(max_size=100)
    assert not ps.wants(5, 0)
    assert not ps.wants(5, 101)
    assert ps.wants(5, 100)
    off, _ = _store(max_size=0)
    assert not off.wants(5, 1) and not off.store(5, b"x")


def test_no_store_while_a_handle_is_open():
    # a READ may be in flight on an open handle, holding the folio locks notify_store needs
    ps, calls = _store()
    ps.opened(7)
    assert not ps.wants(7, 10)
    assert not ps.store(7, b"y" * 10) and calls == []
    ps.opened(7)
    ps.released(7)
    assert not ps.store(7, b"y" * 10)               # one handle still open
    ps.released(7)
    assert ps.store(7, b"y" * 10) and len(calls) == 1
    ps.released(9)                                  # an unmatched release does not go negative:
    ps.opened(9)
    assert not ps.store(9, b"w")                    # the one open handle still counts


def test_enosys_turns_stores_off_and_other_errors_skip_one():
    def failing(err):
        def notify(ino, off, data):
            raise OSError(err, "no")
        return notify

    ps = pagestore.PageStore(100, notify=failing(errno.ENOENT))
    assert not ps.store(1, b"a") and ps.enabled and ps.wants(1, 1)
    ps = pagestore.PageStore(100, notify=failing(errno.ENOSYS))
    assert not ps.store(1, b"a") and not ps.enabled and not ps.wants(2, 1)


def test_remembered_inodes_are_bounded(monkeypatch):
    monkeypatch.setattr(pagestore, "REMEMBER", 3)
    ps, _ = _store()
    for ino in range(1, 6):
        assert ps.store(ino, b"z")
    assert [ps.wants(i, 1) for i in range(1, 6)] == [True, True, False, False, False]   # oldest forgotten
