"""nowait mode (erofs_mount/nowait.py): the FUSE daemon's inline attempt on its trio thread never waits
for a lock a worker thread holds, since that thread may be waiting for the trio loop itself (a
registry read through the bridge): the deadlock that hung a cold lz4hc registry mount under 1 MiB
READs."""

from __future__ import annotations

import threading
from contextlib import contextmanager

import pytest

from erofs_mount.erofs.image import Image
from erofs_mount.nowait import WouldBlock, call_nowait, hold
from tests import corpuslib


@contextmanager
def held_elsewhere(lock):
    """*lock* held by another thread until the block ends."""
    taken, release = threading.Event(), threading.Event()

    def other():
        with lock:
            taken.set()
            release.wait(10)

    t = threading.Thread(target=other)
    t.start()
    try:
        assert taken.wait(10)
        yield
    finally:
        release.set()
        t.join(10)


def test_hold_waits_normally_and_refuses_in_nowait_mode():
    lock = threading.RLock()
    with held_elsewhere(lock):
        with pytest.raises(WouldBlock):
            call_nowait(inline, lock)
    assert call_nowait(inline, lock) == "held"      # free now: taken, in either mode
    assert inline(lock) == "held"


def inline(lock) -> str:
    with hold(lock):
        return "held"


def test_an_inline_read_of_compressed_data_gives_way_to_a_mapping_in_another_thread():
    path = corpuslib.image("lz4").path
    with open(path, "rb") as f:
        raw = f.read()
    image = Image(lambda off, n: raw[off:off + n], size=len(raw))
    nid = image.resolve(b"/big/little-big.dat")
    assert image.inode(nid).is_compressed
    want = image.read(nid, 0, 65536)
    with held_elsewhere(image.zreader._lock):     # a mapping under way in another thread
        with pytest.raises(WouldBlock):
            call_nowait(image.read, nid, 65536, 65536)
    assert image.read(nid, 0, 65536) == want      # nothing half-done was left behind
