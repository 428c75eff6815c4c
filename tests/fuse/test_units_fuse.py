"""FUSE backend pieces that need no mount: options, inode numbering, the inline-read source."""

from __future__ import annotations

import os

import pytest

from tests import corpuslib
from erofs_mount.backends.fuse.accel import inline
from erofs_mount.backends.fuse.lifecycle import FuseOptions
from erofs_mount.backends.fuse.source import open_image
from erofs_mount.errors import UsageError

pyfuse3 = pytest.importorskip("pyfuse3")
from erofs_mount.backends.fuse.ops import ErofsOperations  # noqa: E402


def test_options_from_mount_option_strings():
    o = FuseOptions.from_strings(["nosuid", "noexec", "relatime", "silent"],
                                 {"allow_other": "", "fsname": "a,b", "uid": "12", "max_read": "131072"})
    assert (o.allow_other, o.nosuid, o.noexec, o.nodev, o.uid, o.gid, o.max_read) == (
        True, True, True, False, 12, None, 131072)
    assert o.flags == ("relatime",)
    opts = o.libfuse_options("/img.erofs", is_root=True)
    assert {"ro", "subtype=erofs", "fsname=a\\,b", "allow_other", "default_permissions", "nosuid", "noexec",
            "relatime", "max_read=131072"} <= opts
    assert "nodev" not in opts
    with pytest.raises(UsageError, match="bogus"):
        FuseOptions.from_strings([], {"bogus": "1"})
    with pytest.raises(UsageError):
        FuseOptions(allow_other=True, allow_root=True).libfuse_options("x", is_root=True)


def test_default_permissions_defaults():
    assert FuseOptions().resolved_default_permissions(is_root=False)
    assert not FuseOptions().resolved_default_permissions(is_root=True)
    assert FuseOptions(allow_other=True).resolved_default_permissions(is_root=True)
    assert not FuseOptions(default_permissions=False).resolved_default_permissions(is_root=False)


@pytest.mark.parametrize("name", ["plain-inline-4k", "metabox-lzma-lz4hc"])
def test_inode_numbers_round_trip_and_never_hit_the_root(name):
    img = corpuslib.image(name)
    try:
        image, opened = open_image(str(img.path), [str(d) for d in img.devices])
    except Exception as exc:  # noqa: BLE001 - e.g. compression support absent
        pytest.skip(f"{name} does not open: {exc}")
    try:
        ops = ErofsOperations(image)
        assert ops.ino_of(image.root_nid) == pyfuse3.ROOT_INODE
        assert ops.nid_of(pyfuse3.ROOT_INODE) == image.root_nid
        top = 1 << 63
        nids = [0, 1, 2, 3, 41, 42, 48, 1 << 31, (1 << 40) + 5, top, top | 1, top | 77, top | (1 << 33)]
        seen = set()
        for nid in nids:
            if nid == image.root_nid or (nid >> 63 and not image.sb.has_metabox):
                continue
            ino = ops.ino_of(nid)
            assert ino not in (0, pyfuse3.ROOT_INODE) and ino < 1 << 64
            assert ops.nid_of(ino) == nid
            assert ino not in seen
            seen.add(ino)
        manifest = corpuslib.load_manifest(img.manifest)
        for path, rec in list(manifest["entries"].items())[1:50]:
            assert ops.ino_of(image.resolve(path)) == rec["ino"]  # st_ino as the kernel shows it
    finally:
        for src in opened:
            src.close()


def test_local_reader_nowait_and_read_around(tmp_path, monkeypatch):
    path = tmp_path / "blob"
    data = os.urandom(1 << 20)
    path.write_bytes(data)

    class Src:
        def __init__(self):
            self.fd = os.open(path, os.O_RDONLY)
            self.size = len(data)
            self.calls = []

        def fileno(self):
            return self.fd

        def pread(self, off, n):
            self.calls.append((off, n))
            return os.pread(self.fd, n, off)

    src = Src()
    try:
        r = inline.LocalReader(src)
        assert r.read_at(5000, 100) == data[5000:5100]
        assert src.calls == [(0, inline.READ_AROUND)]          # the aligned chunk around a small read
        assert r.read_at(len(data) - 10, 100) == data[-10:]     # short only at the end
        assert r.read_at(len(data), 10) == b""
        advice = []
        monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, how: advice.append((off, n, how)))
        assert r.read_at(0, 300_000) == data[:300_000]          # big reads go straight through,
        assert advice == [(300_000, min(inline.BIG_AHEAD, len(data) - 300_000), os.POSIX_FADV_WILLNEED)]
        assert r.read_at(len(data) - 300_000, 300_000) == data[-300_000:]   # and ask for what follows
        assert len(advice) == 1                                 # (nothing after the end)
        monkeypatch.undo()
        with inline.nowait():
            assert inline.nowait_active()
            try:
                assert r.read_at(7, 9) == data[7:16]            # in the page cache: served inline
            except inline.WouldBlock:
                pass                                            # (a filesystem without RWF_NOWAIT)
        assert not inline.nowait_active()
        # clustered misses (a tree walk) prefetch what follows; an isolated miss does not
        big = inline.LocalReader(type("S", (), {"size": 1 << 30, "fileno": lambda self: src.fd})())
        assert big.prefetch_after_miss(100 * inline.READ_AROUND, 101 * inline.READ_AROUND) is None
        assert big.prefetch_after_miss(103 * inline.READ_AROUND, 104 * inline.READ_AROUND) == (
            104 * inline.READ_AROUND, inline.PREFETCH)
        assert big.prefetch_after_miss(5000 * inline.READ_AROUND, 5001 * inline.READ_AROUND) is None
        end = 1 << 30
        assert big.prefetch_after_miss(end - 3 * inline.READ_AROUND, end - 2 * inline.READ_AROUND) is None
        assert big.prefetch_after_miss(end - 2 * inline.READ_AROUND, end - inline.READ_AROUND) == (
            end - inline.READ_AROUND, inline.READ_AROUND)                              # clamped to the size
        assert big.prefetch_after_miss(end - inline.READ_AROUND, end) is None           # nothing after
    finally:
        os.close(src.fd)


@pytest.mark.parametrize("room", [1, 3, 1000])
def test_readdir_resumes_exactly_and_the_end_costs_no_reader_call(monkeypatch, room):
    """readdir as the kernel drives it (reply buffer of ``room`` entries, resume at the last cookie):
    every entry once, in the reader's order, each prepared once; the final call at the end position is
    answered empty without another reader call."""
    trio = pytest.importorskip("trio")
    img = corpuslib.image("plain-inline-4k")
    image, opened = open_image(str(img.path), [])
    try:
        ops = ErofsOperations(image)

        def reply(token, name, attr, next_id):
            if len(token) >= room:
                return False
            token.append((name, attr.st_ino, next_id))
            return True

        monkeypatch.setattr(pyfuse3, "readdir_reply", reply)
        batches, prepared = [], []
        real_batch = ops._dir_batch

        def batch(nid, pos):
            batches.append(pos)
            out = real_batch(nid, pos)
            prepared.extend(e[0] for e in out)
            return out
        monkeypatch.setattr(ops, "_dir_batch", batch)

        async def listing(ino):
            out, pos, calls = [], 0, 0
            while calls < 10_000:
                calls += 1
                token = []
                await ops.readdir(ino, pos, token)
                if not token:
                    return out
                out += token
                pos = token[-1][2]
            raise AssertionError("readdir never ended")

        subdirs = [e.nid for e in image.iterdir(image.root_nid) if e.file_type == 2 and e.name not in (b".", b"..")]
        assert subdirs
        for nid in (image.root_nid, subdirs[0], image.resolve(b"/bigdir")):  # 3,002 entries
            want = [(e.name, ops.ino_of(e.nid), e.next_pos) for e in image.iterdir(nid)]
            prepared.clear()
            got = trio.run(listing, ops.ino_of(nid))
            assert got == want
            # entries prepared but not sent wait for the next READDIR: each entry is prepared once
            assert sorted(prepared) == sorted(e[0] for e in want)
            batches.clear()
            assert trio.run(listing, ops.ino_of(nid)) == want   # a second listing: same, and
            assert all(pos != want[-1][2] for pos in batches)    # the end position asked no reader call
    finally:
        for src in opened:
            src.close()


def test_read_ahead_option():
    from erofs_mount.backends.fuse.config import COMPRESSED_READ_AHEAD_KB

    auto = FuseOptions()
    assert auto.resolved_read_ahead_kb(is_root=True, compressed=True) == COMPRESSED_READ_AHEAD_KB
    assert auto.resolved_read_ahead_kb(is_root=True, compressed=False) == 0
    assert auto.resolved_read_ahead_kb(is_root=False, compressed=True) == 0   # not ours to set
    o = FuseOptions.from_strings([], {"read_ahead_kb": "256"})
    assert o.resolved_read_ahead_kb(is_root=True, compressed=False) == 256
    assert "ro" in o.libfuse_options("img", is_root=True)
    with pytest.raises(UsageError, match="needs root"):
        o.libfuse_options("img", is_root=False)
    assert FuseOptions.from_strings([], {"read_ahead_kb": "0"}).libfuse_options("img", is_root=False)
    with pytest.raises(UsageError, match="read_ahead_kb=70000"):
        FuseOptions(read_ahead_kb=70000).libfuse_options("img", is_root=True)
