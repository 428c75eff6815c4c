"""The holder <-> daemon link of fanotify mode (backends/fanotify/link.py): fixed records, any split."""

import errno

import pytest

from erofs_mount.backends.fanotify import link
from erofs_mount.errors import ErofsMountError


def test_records_round_trip_in_any_split():
    stream = link.fill(7, 4096, 8192) + link.done(7) + link.done(9, errno.EIO) + link.fill(2**31 - 1, 2**63, 1)
    for cut in range(len(stream) + 1):
        d = link.Decoder()
        got = d.feed(stream[:cut]) + d.feed(stream[cut:])
        assert got == [link.Fill(7, 4096, 8192), link.Done(7, 0), link.Done(9, errno.EIO),
                       link.Fill(2**31 - 1, 2**63, 1)], cut
        assert d.pending_bytes == 0
    d = link.Decoder()
    assert d.feed(stream[:30]) == [link.Fill(7, 4096, 8192)] and d.pending_bytes == 6


def test_a_record_of_unknown_kind_is_a_protocol_error():
    bad = link.RECORD.pack(3, 1, 0, 0)
    with pytest.raises(ErofsMountError) as info:
        link.Decoder().feed(link.fill(1, 0, 4096) + bad)
    assert info.value.errno == errno.EPROTO
    with pytest.raises(ErofsMountError):   # an errno no errno table has
        link.Decoder().feed(link.RECORD.pack(link.DONE, 1, 1 << 20, 0))
