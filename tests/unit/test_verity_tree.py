"""dm-verity trees (verity/tree.py, format.py, options.py): built as veritysetup builds them, checked
block by block, and the root-hash decision."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess

import pytest
import trio

from erofs_mount.errors import IntegrityError, UsageError
from erofs_mount.verity import tree
from erofs_mount.verity.format import ANNOTATION_OFFSET, ANNOTATION_ROOT, format_image
from erofs_mount.verity.options import choose
from erofs_mount.verity.source import open_verified
from tests import corpuslib

VERITYSETUP = shutil.which("veritysetup")
need_veritysetup = pytest.mark.skipif(VERITYSETUP is None, reason="veritysetup is not installed (Debian cryptsetup-bin)")


def _blocks(data: bytes, size: int = 4096):
    return [data[i:i + size] for i in range(0, len(data), size)]


@need_veritysetup
@pytest.mark.parametrize("nblocks", [1, 2, 10, 128, 129, 16385])
def test_tree_and_root_hash_match_veritysetup(tmp_path, nblocks):
    data = random.Random(nblocks).randbytes(nblocks * 4096)
    path = tmp_path / "img"
    path.write_bytes(data)
    salt = bytes(range(7))
    out = subprocess.run([VERITYSETUP, "format", str(path), str(path), f"--hash-offset={len(data)}",
                          f"--salt={salt.hex()}", "--uuid=12345678-1234-1234-1234-123456789abc"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    theirs = next(line.split()[-1] for line in out.splitlines() if line.startswith("Root hash"))
    uuid = bytes.fromhex("12345678123412341234123456789abc")
    p = tree.Params(data_blocks=nblocks, salt=salt, uuid=uuid)
    root, levels = tree.build(p, _blocks(data))
    assert root.hex() == theirs
    assert path.read_bytes()[len(data):] == tree.hash_area(p, levels)  # the same bytes on disk
    assert tree.parse_superblock(tree.pack_superblock(p)) == p


@need_veritysetup
def test_veritysetup_verifies_what_verity_format_wrote(tmp_path):
    img = tmp_path / "lz4.erofs"
    shutil.copyfile(corpuslib.image("lz4").path, img)
    size = img.stat().st_size
    root, offset, p = format_image(str(img), salt=b"\x01\x02")
    assert offset == (size + 4095) // 4096 * 4096
    subprocess.run([VERITYSETUP, "verify", str(img), str(img), root.hex(), f"--hash-offset={offset}"],
                   check=True, capture_output=True, timeout=120)
    bad = subprocess.run([VERITYSETUP, "verify", str(img), str(img), "00" * 32, f"--hash-offset={offset}"],
                         capture_output=True, timeout=120)
    assert bad.returncode != 0


def test_verity_format_refuses_a_second_tree_and_replaces_it_with_force(tmp_path):
    img = tmp_path / "a.erofs"
    shutil.copyfile(corpuslib.image("plain-inline-4k").path, img)
    r1, off1, _ = format_image(str(img), salt=b"s")
    with pytest.raises(UsageError, match="already"):
        format_image(str(img))
    r2, off2, _ = format_image(str(img), salt=b"s", force=True)
    assert (r1, off1) == (r2, off2)
    r3, _, _ = format_image(str(img), salt=b"t", force=True)
    assert r3 != r1


def test_tree_state_checks_blocks_and_says_what_to_read_first():
    nblocks = 129 * 128 + 5  # three levels
    data = random.Random(3).randbytes(nblocks * 4096)
    p = tree.Params(data_blocks=nblocks, salt=b"salt")
    root, levels = tree.build(p, _blocks(data))
    device = data + tree.hash_area(p, levels)
    st = tree.TreeState(p, len(data), root)
    assert st.geo.levels == 3
    order = []
    for _ in range(4):
        m = st.missing(100 * 128, 100 * 128 + 3)
        if m is None:
            break
        order.append(m[0])
        off, n = st.byte_range(*m)
        assert st.add(m[0], m[1], device[off:off + n]) == []
    assert order == [2, 1, 0]  # the top level first
    blk = 100 * 128 + 2
    assert st.check(blk, data[blk * 4096:(blk + 1) * 4096]) == []
    damaged = bytearray(data[blk * 4096:(blk + 2) * 4096])
    damaged[5000] ^= 1
    assert st.check(blk, damaged) == [blk + 1]
    # a hash block that does not match its parent is refused
    m = st.missing(0, 0)
    off, n = st.byte_range(*m)
    forged = bytearray(device[off:off + n])
    forged[0] ^= 1
    assert st.add(m[0], m[1], forged) == [m[1]]
    assert st.missing(0, 0) == m


class _Mem:
    def __init__(self, data: bytes) -> None:
        self.data = bytearray(data)
        self.size = len(data)
        self.reads = 0

    async def read_at(self, offset, length):
        self.reads += 1
        return bytes(self.data[offset:offset + length])

    def pread(self, offset, length):
        return bytes(self.data[offset:offset + length])

    async def aclose(self):
        pass


def _formatted(tmp_path, name="plain-inline-4k"):
    img = tmp_path / f"{name}.erofs"
    shutil.copyfile(corpuslib.image(name).path, img)
    root, offset, _ = format_image(str(img), salt=b"x")
    return img.read_bytes(), root, offset


def test_a_verified_source_reads_good_blocks_and_fails_only_damaged_ones(tmp_path):
    raw, root, offset = _formatted(tmp_path)
    mem = _Mem(raw)
    mem.data[offset // 2 + 100] ^= 0xFF  # one data block damaged
    bad_block = (offset // 2 + 100) // 4096

    async def main():
        src = await open_verified(mem, root, name="t")
        assert src.size == offset
        assert await src.read_at(0, 8192) == raw[:8192]
        with pytest.raises(IntegrityError, match=f"data block {bad_block} "):
            await src.read_at(bad_block * 4096 + 10, 100)
        # the blocks around it read fine, through the sync path too
        assert await src.read_at((bad_block - 1) * 4096, 4096) == raw[(bad_block - 1) * 4096:bad_block * 4096]
        assert src.pread((bad_block + 1) * 4096, 4096) == raw[(bad_block + 1) * 4096:(bad_block + 2) * 4096]
        with pytest.raises(IntegrityError):
            src.pread(bad_block * 4096, 1)
        st = src.stats()
        assert st["verity_blocks_failed"] >= 2 and st["verity_refetches"] >= 2
    trio.run(main)


def test_a_wrong_root_hash_or_a_damaged_tree_fails_the_open(tmp_path):
    raw, root, offset = _formatted(tmp_path)

    async def opens(data, r, **kw):
        return await open_verified(_Mem(data), r, name="t", **kw)

    with pytest.raises(IntegrityError, match="root hash"):
        trio.run(opens, raw, bytes(32))
    damaged = bytearray(raw)
    damaged[1024 + 8] ^= 1  # the EROFS superblock's block
    with pytest.raises(IntegrityError, match="superblock's block does not verify"):
        trio.run(opens, bytes(damaged), root)
    with pytest.raises(IntegrityError, match="no dm-verity (tree|superblock)"):
        trio.run(opens, raw[:offset], root)  # no tree appended
    with pytest.raises(IntegrityError, match="no dm-verity superblock"):
        trio.run(lambda: opens(raw, root, hash_offset=offset - 4096))  # a wrong verity.hashoffset


def test_the_cache_gate_accepts_only_verified_chunks(tmp_path):
    raw, root, offset = _formatted(tmp_path)

    async def main():
        src = await open_verified(_Mem(raw), root, name="t")
        await src.read_at(0, 4096)  # the level-0 hash blocks of the start are loaded
        assert src.accept(0, raw[:65536])
        bad = bytearray(raw[:65536])
        bad[40000] ^= 1
        assert not src.accept(0, bytes(bad))
        assert not src.accept(100, raw[100:4196])  # not whole blocks
        tail = raw[offset:]  # the superblock and the tree: their bytes as verified
        assert src.accept(offset, tail)
        forged = bytearray(tail)
        forged[-1] ^= 1
        assert not src.accept(offset, bytes(forged))
    trio.run(main)


def test_the_root_hash_comes_only_from_what_the_user_trusts():
    good = "ab" * 32
    ann = {ANNOTATION_ROOT: good, ANNOTATION_OFFSET: "8192"}
    assert choose("auto", None, None) == (None, None)
    c, w = choose("auto", good, None)
    assert c.root == bytes.fromhex(good) and c.origin == "verity.roothash" and w is None
    c, w = choose("auto", None, None, annotations=ann, pinned=True)
    assert c.root == bytes.fromhex(good) and c.hash_offset == 8192 and c.origin == "annotation"
    c, w = choose("auto", None, None, annotations=ann, pinned=False)  # reached through a tag
    assert c is None and "not trusted" in w
    with pytest.raises(UsageError, match="not trusted"):
        choose("require", None, None, annotations=ann, pinned=False)
    with pytest.raises(UsageError, match="no trusted root hash"):
        choose("require", None, None)
    with pytest.raises(UsageError, match="contradicts"):
        choose("off", good, None)
    assert choose("off", None, None, annotations=ann, pinned=True) == (None, None)
    with pytest.raises(UsageError, match="bad verity annotation"):
        choose("auto", None, None, annotations={ANNOTATION_ROOT: "xyz"}, pinned=True)


def test_verity_options_are_checked_at_parse_time():
    from erofs_mount.options import parse_options

    with pytest.raises(UsageError, match="verity.roothash"):
        parse_options(["verity.roothash=12"])
    with pytest.raises(UsageError, match="verity="):
        parse_options(["verity=maybe"])
    with pytest.raises(UsageError, match="verity.hashoffset"):
        parse_options(["verity.hashoffset=100"])
    o = parse_options([f"verity.roothash={'cd' * 32},verity.hashoffset=4096"])
    assert o.verity_choice().hash_offset == 4096


def test_disk_cache_forget_clears_blocks(tmp_path):
    from erofs_mount.sources.diskcache import DiskCache

    data = os.urandom(3 * 4096)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    dc = DiskCache.open(str(tmp_path), digest, len(data))
    dc.write(0, data)
    assert dc.complete and dc.verify()
    dc.forget(4096, 4097)
    assert dc.has(0, 4096) and not dc.has(4096, 8192) and dc.has(8192, 12288)
    assert not dc.verified
    dc.close()
    again = DiskCache.open(str(tmp_path), digest, len(data))  # what the map file says
    assert not again.has(4096, 8192) and not again.verified
    again.close()


def test_disk_cache_marks_are_per_root_hash_and_follow_the_blocks(tmp_path):
    from erofs_mount.sources.diskcache import DiskCache

    data = os.urandom(4 * 4096)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    dc = DiskCache.open(str(tmp_path), digest, len(data))
    dc.write(0, data[:8192])
    dc.mark(0, 8192)           # no marks in use yet: nothing
    dc.use_marks("aa" * 32)
    assert not dc.marked(0, 4096)
    dc.mark(0, 16384)          # only present blocks can be marked
    assert dc.marked(0, 8192) and not dc.marked(8192, 12288)
    dc.forget(4096, 8192)
    assert dc.marked(0, 4096) and not dc.marked(4096, 8192)
    dc.close()
    again = DiskCache.open(str(tmp_path), digest, len(data))
    again.use_marks("aa" * 32)
    assert again.marked(0, 4096) and not again.marked(4096, 8192)
    again.use_marks("bb" * 32)  # another root hash: the marks are not its
    assert not again.marked(0, 4096)
    again.close()


def test_disk_cache_drops_marks_of_blocks_that_are_gone(tmp_path):
    """A mark on disk whose block was forgotten by a mount that kept no marks: use_marks drops it,
    and the block written again later is not trusted by that old mark."""
    from erofs_mount.sources.diskcache import DiskCache

    data = os.urandom(20 * 4096)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    dc = DiskCache.open(str(tmp_path), digest, len(data))
    dc.write(0, data[:16 * 4096])
    dc.use_marks("aa" * 32)
    dc.mark(0, 16 * 4096)
    dc.close()
    plain = DiskCache.open(str(tmp_path), digest, len(data))    # an unverified mount: no marks in use
    plain.forget(9 * 4096, 10 * 4096)
    plain.close()
    again = DiskCache.open(str(tmp_path), digest, len(data))
    again.use_marks("aa" * 32)
    assert again.marked(0, 9 * 4096) and again.marked(10 * 4096, 16 * 4096)
    assert not again.marked(9 * 4096, 10 * 4096)
    again.write(9 * 4096, data[9 * 4096:10 * 4096])
    assert again.has(0, 16 * 4096) and not again.marked(0, 16 * 4096)
    again.close()


def test_disk_cache_replace_writes_over_an_unverified_copy(tmp_path):
    """A checked chunk fetched again from the registry replaces what an unverified mount left in the
    entry before it is marked (a plain write skips present blocks: the old bytes would be marked)."""
    from erofs_mount.sources.diskcache import DiskCache

    data = os.urandom(4 * 4096)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    bad = bytearray(data)
    bad[5000] ^= 1
    dc = DiskCache.open(str(tmp_path), digest, len(data))
    dc.write(0, bytes(bad[:8192]))          # an unverified mount's copy, one block damaged
    dc.use_marks("aa" * 32)
    assert dc.write(0, data[:8192]) == 0 and dc.read(0, 8192) == bytes(bad[:8192])   # skipped
    assert dc.write(0, data[:8192], replace=True) == 8192
    dc.mark(0, 8192)
    assert dc.marked(0, 8192) and dc.read(0, 8192) == data[:8192]
    dc.close()


@pytest.mark.parametrize("hash_type", [0, 1])
@pytest.mark.parametrize("first, count", [(0, 300), (127, 3), (250, 50), (5, 1), (128, 1)])
def test_check_finds_exactly_the_damaged_blocks_across_hash_blocks(hash_type, first, count):
    """TreeState.check's loop (one parent per 128 blocks, the salted hash inlined for type 1) and its
    short way for one block, against the plain definition, for runs that start and end inside hash
    blocks."""
    n = 300
    data = bytearray(random.Random(hash_type).randbytes(n * 4096))
    p = tree.Params(data_blocks=n, salt=b"salt!", hash_type=hash_type)
    root, levels = tree.build(p, _blocks(bytes(data)))
    area = tree.hash_area(p, levels)
    st = tree.TreeState(p, len(data), root)
    for level in range(st.geo.levels - 1, -1, -1):
        off, nb = st.byte_range(level, 0, st.geo.level_blocks[level])
        assert st.add(level, 0, area[off - len(data):off - len(data) + nb]) == []
    chunk = bytes(data[first * 4096:(first + count) * 4096])
    assert st.check(first, chunk) == []
    damaged = bytearray(chunk)
    for k in (0, count // 2, count - 1):
        damaged[k * 4096 + 7] ^= 1
    assert st.check(first, bytes(damaged)) == sorted({first, first + count // 2, first + count - 1})


class _Shifting(_Mem):
    """A local file that changes between reads: each multi-block read of the data area comes back
    with the next listed block damaged; a read of one block is clean."""

    def __init__(self, data: bytes, data_size: int, damage: list[int]) -> None:
        super().__init__(data)
        self.data_size, self.damage = data_size, list(damage)

    def pread(self, offset, length):
        out = bytearray(self.data[offset:offset + length])
        if length > 4096 and offset + length <= self.data_size and self.damage:
            out[self.damage.pop(0) * 4096 - offset] ^= 0xFF
        return bytes(out)


def test_the_sync_path_returns_only_blocks_it_checked(tmp_path):
    """A block that fails and reads fine once more is patched in alone: the range is not read again
    unchecked (a file changing under the mount must not slip bytes past the tree)."""
    raw, root, offset = _formatted(tmp_path)

    async def main():
        mem = _Shifting(raw, offset, [])
        src = await open_verified(mem, root, name="t")
        mem.damage = [3, 5]     # the first read: block 3 damaged; any later range read: block 5
        assert src.pread(2 * 4096, 6 * 4096) == raw[2 * 4096:8 * 4096]
        assert mem.damage == [5]    # no second read of the range
        st = src.stats()
        assert st["verity_refetches"] == 1 and st["verity_blocks_failed"] == 0
    trio.run(main)


def test_a_digest_mismatch_keeps_the_blocks_marked_verified(tmp_path):
    """An entry completed by an unverified mount (one block differs) and a verified one: the digest
    fails, the marked blocks stay, the others go (the bad one among them)."""
    from erofs_mount.sources.diskcache import DiskCache

    data = os.urandom(6 * 4096 + 100)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    bad = bytearray(data)
    bad[3 * 4096 + 7] ^= 1
    dc = DiskCache.open(str(tmp_path), digest, len(data))
    dc.use_marks("aa" * 32)
    dc.write(0, data[:3 * 4096])
    dc.mark(0, 3 * 4096)                       # checked against the tree before they were written
    dc.write(3 * 4096, bytes(bad[3 * 4096:]))  # written by a mount that did not verify
    assert dc.complete and not dc.verify()
    assert dc.has(0, 3 * 4096) and dc.marked(0, 3 * 4096) and dc.read(0, 3 * 4096) == data[:3 * 4096]
    assert not dc.has(3 * 4096, 3 * 4096 + 1) and not dc.has(len(data) - 1, len(data)) and not dc.complete
    dc.write(3 * 4096, data[3 * 4096:])        # fetched again: now the whole entry matches
    assert dc.complete and dc.verify()
    dc.close()
    again = DiskCache.open(str(tmp_path), digest, len(data))
    assert again.complete and again.verified
    again.close()
    nomarks = DiskCache.open(str(tmp_path / "b"), digest, len(data))   # no marks in use: all goes
    nomarks.write(0, bytes(bad))
    assert not nomarks.verify() and not nomarks.has(0, 1)
    nomarks.close()


def test_tar_choice_is_the_digest_s_trust():
    from erofs_mount.verity.options import tar_choice

    kw = {"what": "L", "media_type": "tar"}
    assert tar_choice("auto", None, None, pinned=False, indexed=True, **kw) is True
    assert tar_choice("off", None, None, pinned=True, indexed=True, **kw) is False
    assert tar_choice("auto", None, None, pinned=True, indexed=False, **kw) is False   # oci.tarindex
    assert tar_choice("require", None, None, pinned=True, indexed=True, **kw) is True
    with pytest.raises(UsageError, match="pin the reference by digest"):
        tar_choice("require", None, None, pinned=False, indexed=True, **kw)
    with pytest.raises(UsageError, match="oci.tarindex"):
        tar_choice("require", None, None, pinned=True, indexed=False, **kw)
    with pytest.raises(UsageError, match="are for EROFS layers"):
        tar_choice("auto", "ab" * 32, None, pinned=True, indexed=True, **kw)
