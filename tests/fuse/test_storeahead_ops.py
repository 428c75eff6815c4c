"""Store-ahead in the operations (backends/fuse/accel/storeahead.py), driven without a mount: readdir lists a
directory, each OPEN suggests the next file listed, and the idle-time store hands the kernel that
file's exact bytes, under the page store's rules."""

from __future__ import annotations

import os

import pytest

from erofs_mount.backends.fuse.accel import inline
from erofs_mount.backends.fuse.source import open_image
from erofs_mount.backends.fuse.accel.pagestore import STORE_MAX
from tests import corpuslib

pyfuse3 = pytest.importorskip("pyfuse3")
trio = pytest.importorskip("trio")
from erofs_mount.backends.fuse.ops import ErofsOperations  # noqa: E402

DIR = b"/sizes/random-find10"


@pytest.fixture(params=["plain-inline-4k", "lz4hc-pcluster-64k"])
def listed(request, monkeypatch):
    """(ops with a recording notify, [(path, ino, size)] of the directory's files the page store takes,
    in listing order: an empty or large file between two of them is skipped by the suggestion too)."""
    img = corpuslib.image(request.param)
    try:
        image, opened = open_image(str(img.path), [])
    except Exception as exc:  # noqa: BLE001 - e.g. compression support absent
        pytest.skip(f"{request.param} does not open: {exc}")

    def make(inline_reads=True):
        ops = ErofsOperations(image, inline=inline_reads)
        ops.notified = []
        ops.pages._notify = lambda ino, off, data: ops.notified.append((ino, off, bytes(data)))
        return ops

    def reply(token, name, attr, next_id):
        token.append((name, attr))
        return True

    monkeypatch.setattr(pyfuse3, "readdir_reply", reply)
    nid = image.resolve(DIR)

    def listing(ops):
        token = []
        trio.run(ops.readdir, ops.ino_of(nid), 0, token)
        return [(DIR.decode() + "/" + name.decode(), a.st_ino, a.st_size) for name, a in token
                if name not in (b".", b"..") and a.st_mode & 0o170000 == 0o100000
                and 0 < a.st_size <= STORE_MAX]

    yield make, listing
    for src in opened:
        src.close()


def _open(ops, ino):
    return trio.run(ops.open, ino, os.O_RDONLY, None).fh


def test_the_next_file_listed_is_stored_in_idle_time_with_its_exact_bytes(listed):
    make, listing = listed
    ops = make()
    files = listing(ops)
    assert len(files) >= 4
    (p0, i0, s0), (p1, i1, s1), (p2, i2, s2), (_p3, i3, s3) = files[:4]
    fh = _open(ops, i0)                                # stored at its own OPEN, suggests the next file
    assert ops.notified == [(i0, 0, corpuslib.source_bytes(p0, 0, s0))]
    assert ops.ahead.pending == (i1, s1)
    trio.run(ops.release, fh)
    ops.ahead.run()                                    # the idle-time store
    assert ops.notified[1:] == [(i1, 0, corpuslib.source_bytes(p1, 0, s1))]
    assert ops.ahead_stores == 1 and ops.ahead.pending is None
    fh = _open(ops, i1)                                # already stored: answered without reading
    assert len(ops.notified) == 2 and ops.ahead.pending == (i2, s2)
    trio.run(ops.release, fh)

    ops.pages.opened(i2)                               # a handle of the next file is open (a READ may be
    ops.ahead.run()                                    # in flight): no store, the deadlock rule
    assert len(ops.notified) == 2
    ops.pages.released(i2)

    fh = _open(ops, i2)
    assert ops.notified[2:] == [(i2, 0, corpuslib.source_bytes(p2, 0, s2))] and ops.ahead.pending == (i3, s3)

    def would_block(*args):
        raise inline.WouldBlock
    ops._read_sync = would_block                       # bytes not at hand: the guess is dropped quietly
    ops.ahead.run()
    assert len(ops.notified) == 3 and ops.ahead_stores == 1
    trio.run(ops.release, fh)


def test_no_suggestion_without_inline_reads(listed):
    make, listing = listed
    ops = make(inline_reads=False)                     # a source that cannot say "not at hand" (thread hops)
    files = listing(ops)
    _open(ops, files[0][1])
    assert ops.ahead.pending is None
