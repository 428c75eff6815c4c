"""VeritySource: a source whose every byte was checked against a dm-verity tree before anyone gets it.

    src = await open_verified(inner, root, hash_offset=None, name="REF layer 0")

``inner`` is any block source holding an EROFS image with its hash tree appended
(``erofs-mount verity-format``).  ``src.size`` is the data area (the image); the tree is not part
of it.  A read is widened to whole data blocks; the level-0 hash blocks it needs are read first
(the upper levels are read and checked at open, the top one against the root hash), then every
block is hashed and compared.  A mismatch forgets the range in the inner source's caches
(``forget``) and reads it once more (a registry blob: from the network again); a second mismatch
fails the read with ``IntegrityError`` (EIO) and one log line naming the block.  Blocks around it
still read fine.

The sync fast paths of the inner source survive, checked the same way: ``pread`` (a local file)
and ``pread_cached`` (a registry blob's persistent cache) — the latter gives None instead of
reading when a hash block is missing or a block does not match, so the async path refetches.

A registry blob gets ``accept`` as its cache gate (sources/oci/blob.py): a chunk enters its memory
or persistent cache only when every block in it verifies (data blocks against their loaded
level-0 hash; tree blocks against their parent; the superblock's block equal to what was read at
open), so nothing unverified is cached.
"""

from __future__ import annotations

import logging

from ..errors import IntegrityError, ShortReadError
from ..sources.cache import clamp
from .tree import SB_SIZE, TreeState, parse_superblock

log = logging.getLogger("erofs_mount.verity")
LEAF_WINDOW = 256  # level-0 hash blocks read at once (1 MiB of digests, 128 MiB of 4 KiB data blocks)
# the hash blocks a read loads reach this far past it: read-ahead (the registry blob's streams, 32 MiB)
# brings chunks before their reader, and a chunk whose hash blocks are not loaded cannot be cached
LOAD_AHEAD = 64 << 20
# what a wrapped source may tell about itself; never a path around the check (fileno, read_cached …)
_FORWARDED = frozenset({"digest", "ref", "platform", "media_type", "layer_index", "manifest_digest",
                        "credentials_origin", "options", "chunk_size", "path",
                        "etag", "version_id", "location", "endpoint", "region", "path_style",   # an S3 object
                        "static_credentials", "pinned_options", "pinned", "pins"})


class VeritySource:
    def __init__(self, inner, state: TreeState, head: bytes, name: str, *, pread=None) -> None:
        """*pread*: the sync positional read to check (default: the inner source's ``pread``; the
        FUSE daemon passes its reader that honours inline.nowait())."""
        self.inner = inner
        self._raw = pread or getattr(inner, "pread", None)
        self.state = state
        self.name = name
        self.size = state.data_size
        self._head = head  # hash offset .. first tree block, as read at open (the superblock)
        self.dbs = state.p.data_block_size
        if self._raw is not None:
            self.pread = self._pread
        if hasattr(inner, "pread_cached"):
            self.pread_cached = self._pread_cached
        self._memory = getattr(inner, "read_memory", None)  # a registry blob's memory cache (gated: checked)
        if self._memory is not None or hasattr(inner, "pread_cached"):
            self.read_cached = self._read_cached
        self.counts = {"verity_refetches": 0, "verity_failures": 0, "verity_uncached_chunks": 0,
                       "verity_gated_reads": 0}
        # a source with a cache gate (sources/oci/blob.py) says which bytes passed it: not hashed twice
        self._trusted = getattr(inner, "read_trusted", None)
        self._on_disk = getattr(inner, "verified_on_disk", None)

    def __getattr__(self, name: str):
        if name in _FORWARDED:
            return getattr(self.inner, name)
        raise AttributeError(name)

    def __repr__(self) -> str:
        return f"VeritySource({self.inner!r}, root={self.state.root.hex()[:16]}…)"

    def stats(self) -> dict:
        st = dict(self.inner.stats()) if hasattr(self.inner, "stats") else {}
        st.update(self.counts)
        st.update({f"verity_{k}": v for k, v in self.state.counts.items()})
        st["verity_root"] = self.state.root.hex()
        return st

    async def aclose(self) -> None:
        await self.inner.aclose()

    def close(self) -> None:
        if hasattr(self.inner, "close"):
            self.inner.close()

    def fileno(self):  # the decoder process must never read around the check
        raise AttributeError("a verified source has no raw descriptor")

    # -- the range of blocks a read covers -----------------------------------------------------
    def _span(self, offset: int, length: int) -> tuple[int, int, int, int]:
        offset, length = clamp(offset, length, self.size)
        first, last = offset // self.dbs, (offset + length - 1) // self.dbs
        return offset, length, first, last

    def _fail_message(self, block: int) -> str:
        return (f"{self.name}: data block {block} (bytes {block * self.dbs}-{(block + 1) * self.dbs - 1}) "
                f"does not match the dm-verity tree (root {self.state.root.hex()[:16]}…): read fails with EIO")

    def _fail(self, block: int) -> IntegrityError:
        self.counts["verity_failures"] += 1
        self.state.counts["blocks_failed"] += 1
        msg = self._fail_message(block)
        log.error("%s", msg)
        return IntegrityError(msg)

    def _hash_fail(self, level: int, index: int) -> IntegrityError:
        off, _ = self.state.byte_range(level, index, 1)
        top = level == self.state.geo.levels - 1
        what = ("the tree's top block does not match the root hash (wrong verity.roothash?)" if top else
                f"hash block {index} of level {level} (byte {off}) does not match its parent")
        msg = f"{self.name}: {what}"
        log.error("%s", msg)
        self.state.counts["blocks_failed"] += 1
        return IntegrityError(msg)

    def _good_again(self, block: int, again) -> bool:
        """Whether data block *block*, read once more after it failed, verifies now."""
        self.counts["verity_refetches"] += 1
        return len(again) == self.dbs and not self.state.check(block, again)

    def _forget(self, offset: int, length: int) -> None:
        forget = getattr(self.inner, "forget", None)
        if forget is not None:
            forget(offset, length)

    # -- async path ------------------------------------------------------------------------------
    async def _load(self, first: int, last: int) -> None:
        st = self.state
        last = min(st.p.data_blocks - 1, last + LOAD_AHEAD // self.dbs)
        for _ in range(st.geo.levels + 1):
            m = st.missing(first, last, widen=LEAF_WINDOW)
            if m is None:
                return
            level, index, count = m
            off, n = st.byte_range(level, index, count)
            data = await self.inner.read_at(off, n)
            if len(data) != n:
                raise ShortReadError(f"{self.name}: the hash tree ends early (byte {off + len(data)})")
            bad = st.add(level, index, data)
            for i in bad:  # once more from the origin
                self.counts["verity_refetches"] += 1
                o, hn = st.byte_range(level, i, 1)
                self._forget(o, hn)
                if st.add(level, i, await self.inner.read_at(o, hn)):
                    raise self._hash_fail(level, i)
        if st.missing(first, last) is not None:
            raise AssertionError("hash blocks still missing after loading every level")

    async def read_at(self, offset: int, length: int) -> bytes:
        data, bad = await self.read_partial(offset, length)
        if bad:
            raise IntegrityError(self._fail_message(bad[0]))
        return data

    async def read_partial(self, offset: int, length: int) -> tuple[bytes, list[int]]:
        """(the bytes, the data blocks that did not verify even when fetched again: zeros there);
        each bad block counted and logged once here.  For callers that keep the good blocks of a
        large range (the fanotify filler: one damaged file must not fail its window's others)."""
        offset, length, first, last = self._span(offset, length)
        if length == 0:
            return b"", []
        await self._load(first, last)
        start, end = first * self.dbs, (last + 1) * self.dbs
        if self._trusted is not None:  # a registry blob: its gate checked (or its cache marked) every chunk
            data, trusted = await self._trusted(start, end - start)
        else:
            data, trusted = await self.inner.read_at(start, end - start), False
        if len(data) != end - start:
            raise ShortReadError(f"{self.name}: short read at {start}: {len(data)} of {end - start} bytes")
        if trusted:
            self.state.counts["blocks_verified"] += last - first + 1
            self.counts["verity_gated_reads"] += 1
            return _cut(data, offset - start, length), []
        # checked on the trio thread: hashing 1 MiB windows in a worker thread measured slower (bench
        # verity, fanotify big: 1.19 -> 1.48 of the unverified time; the GIL changes hands per block)
        bad = self.state.check(first, data)
        failed = []
        if bad:
            data = bytearray(data)
            for b in bad:
                self._forget(b * self.dbs, self.dbs)
                again = await self.inner.read_at(b * self.dbs, self.dbs)
                at = (b - first) * self.dbs
                if not self._good_again(b, again):
                    self._fail(b)
                    failed.append(b)
                    data[at:at + self.dbs] = bytes(self.dbs)
                else:
                    data[at:at + self.dbs] = again
        return _cut(data, offset - start, length), failed

    # -- sync paths ------------------------------------------------------------------------------
    def _pread(self, offset: int, length: int) -> bytes:
        """A local file's positional read, checked (the inner pread may raise WouldBlock: inline)."""
        offset, length, first, last = self._span(offset, length)
        if length == 0:
            return b""
        st = self.state
        for _ in range(st.geo.levels + 1):
            m = st.missing(first, last, widen=LEAF_WINDOW)
            if m is None:
                break
            level, index, count = m
            off, n = st.byte_range(level, index, count)
            bad = st.add(level, index, self._raw(off, n))
            if bad:
                raise self._hash_fail(level, bad[0])
        start, end = first * self.dbs, (last + 1) * self.dbs
        data = self._raw(start, end - start)
        if len(data) != end - start:
            raise ShortReadError(f"{self.name}: short read at {start}")
        bad = st.check(first, data)
        if bad:     # a local file: each bad block read once more (a flaky disk), then EIO
            data = bytearray(data)
            for b in bad:
                again = self._raw(b * self.dbs, self.dbs)
                if not self._good_again(b, again):
                    raise self._fail(b)
                at = (b - first) * self.dbs
                data[at:at + self.dbs] = again  # only the block that was just checked
        return _cut(data, offset - start, length)

    def _pread_cached(self, offset: int, length: int, *, nowait: bool = False) -> bytes | None:
        offset, length, first, last = self._span(offset, length)
        if length == 0:
            return b""
        st = self.state
        if not st.ready(first, last):
            return None
        start, end = first * self.dbs, (last + 1) * self.dbs
        # marked verified before the read and after it: a block repaired (forgotten, fetched again,
        # marked) while the read ran must not vouch for the older bytes the read got
        marked = self._on_disk is not None and self._on_disk(start, end - start)
        data = self.inner.pread_cached(start, end - start, nowait=nowait)
        if data is None or len(data) != end - start:
            return None
        if marked and self._on_disk(start, end - start):
            st.counts["blocks_verified"] += last - first + 1  # checked before it was written, marked so
        elif st.check(first, data):
            return None  # the async path reads (and refetches) it
        return _cut(data, offset - start, length)

    def _read_cached(self, offset: int, length: int) -> bytes | None:
        """Sync, on the trio thread, no I/O wait (the FUSE daemon's inline path): the bytes when they
        are at hand and checked: whole in the memory cache of a blob whose cache gate is this
        source's check (every chunk there passed it), else ``pread_cached(nowait=True)``, else None."""
        if self._memory is not None and getattr(self.inner, "accept", None) is not None:
            offset, length, first, last = self._span(offset, length)
            if length == 0:
                return b""
            if self.state.ready(first, last):
                start, end = first * self.dbs, (last + 1) * self.dbs
                data = self._memory(start, end - start)
                if data is not None and len(data) == end - start:
                    self.state.counts["blocks_verified"] += last - first + 1
                    self.counts["verity_gated_reads"] += 1
                    return _cut(data, offset - start, length)
        if hasattr(self.inner, "pread_cached"):
            return self._pread_cached(offset, length, nowait=True)
        return None

    # -- the cache gate of a registry blob ----------------------------------------------------
    def accept(self, offset: int, data) -> bool:
        """Whether the inner source may cache *data* (at *offset* of the blob): every block in it
        verified.  Sync, no I/O: a block whose hash block is not loaded yet makes it False."""
        st, dbs = self.state, self.dbs
        end = offset + len(data)
        mv = memoryview(data)
        if offset < self.size:
            dend = min(end, self.size)
            if offset % dbs or (dend - offset) % dbs:
                return self._uncached(offset, "not whole blocks")
            first, last = offset // dbs, (dend - 1) // dbs
            if not st.ready(first, last):
                return self._uncached(offset, "its hash blocks are not loaded yet")
            if st.check(first, mv[:dend - offset], count=False):
                return self._uncached(offset, "a block does not match")
        if end > self.size:  # the superblock's block and the tree
            hbs = st.p.hash_block_size
            head_end = st.hash_offset + len(self._head)
            pos = max(offset, self.size)
            if pos < head_end:
                upto = min(end, head_end)
                if bytes(mv[pos - offset:upto - offset]) != self._head[pos - st.hash_offset:upto - st.hash_offset]:
                    return self._uncached(offset, "the tree's superblock differs")
                pos = upto
            while pos < end:
                if pos % hbs or end - pos < hbs:
                    return self._uncached(offset, "not whole hash blocks")
                block = st.blocks.get(pos // hbs)
                if block is None:
                    level_index = self._level_of(pos // hbs)
                    if level_index is None or st.add(*level_index, mv[pos - offset:pos - offset + hbs]):
                        return self._uncached(offset, "a hash block cannot be checked now")
                    block = st.blocks.get(pos // hbs)
                if block is None or mv[pos - offset:pos - offset + hbs] != block:
                    return self._uncached(offset, "a hash block differs")
                pos += hbs
        return True

    def _level_of(self, block_no: int) -> tuple[int, int] | None:
        g = self.state.geo
        for level in range(g.levels):
            start = g.level_start[level]
            if start <= block_no < start + g.level_blocks[level]:
                if level + 1 < g.levels and g.block_no(level + 1, (block_no - start) >> g.bits) not in self.state.blocks:
                    return None  # its parent is not loaded: cannot be checked now
                return level, block_no - start
        return None

    def _uncached(self, offset: int, why: str) -> bool:
        self.counts["verity_uncached_chunks"] += 1
        log.debug("%s: chunk at %d not cached: %s", self.name, offset, why)
        return False


def _cut(data, skip: int, length: int) -> bytes:
    """``length`` bytes of *data* from *skip*, as bytes: *data* itself when that is all of it (a
    whole-block read: no copy of a 1 MiB READ)."""
    if not skip and length == len(data) and type(data) is bytes:
        return data
    return bytes(memoryview(data)[skip:skip + length])


async def _guess_offset(inner, name: str) -> int:
    """Where an appended tree starts: the EROFS image (superblock's block count × block size)
    rounded up to 4 KiB, as verity-format writes it.  Unverified until the tree checks out."""
    from ..erofs.superblock import parse_superblock as parse_erofs

    raw = await inner.read_at(0, 4096)
    try:
        sb = parse_erofs(raw)
    except Exception as exc:  # noqa: BLE001 - said in one line
        raise IntegrityError(f"{name}: cannot find the hash tree (no EROFS superblock: {exc}); give verity.hashoffset=") from None
    size = sb.blocks << sb.blkszbits
    return (size + 4095) // 4096 * 4096


async def open_verified(inner, root: bytes, *, hash_offset: int | None = None, name: str = "image",
                        pread=None, probe: bool = True) -> VeritySource:
    """Check the superblock, the upper levels against *root* and (*probe*) data block 0; then a
    VeritySource.  ``probe=False``: a tree made here (``anchored.py``), whose root hash cannot be
    wrong: no data byte is read before the first reader's."""
    if hash_offset is None:
        hash_offset = await _guess_offset(inner, name)
    if hash_offset + SB_SIZE > inner.size:
        raise IntegrityError(f"{name}: no dm-verity tree at byte {hash_offset}: the source has {inner.size} bytes "
                             f"(format it with `erofs-mount verity-format`)")
    raw = await inner.read_at(hash_offset, SB_SIZE)
    p = parse_superblock(raw, f"byte {hash_offset} of {name}")
    state = TreeState(p, hash_offset, root)
    if state.data_size != hash_offset:
        raise IntegrityError(f"{name}: the dm-verity superblock at byte {hash_offset} covers {state.data_size} bytes "
                             f"of data, not the {hash_offset} before it (a tree appended by verity-format)")
    g, hbs = state.geo, p.hash_block_size
    if g.hash_end * hbs > inner.size:
        raise IntegrityError(f"{name}: the hash tree needs {g.hash_end * hbs} bytes; the source has {inner.size}")
    head = await inner.read_at(hash_offset, g.hash_start * hbs - hash_offset)
    src = VeritySource(inner, state, head, name, pread=pread)
    if g.levels:
        # every level but the bottom one (1/128 of it) at once, top first; the bottom one when it is the top
        top_down = range(g.levels - 1, 0 if g.levels > 1 else -1, -1)
        lo = g.level_start[g.levels - 1]
        hi = g.level_start[0] if g.levels > 1 else g.hash_end
        upper = await inner.read_at(lo * hbs, (hi - lo) * hbs)
        for level in top_down:
            at = (g.level_start[level] - lo) * hbs
            bad = state.add(level, 0, upper[at:at + g.level_blocks[level] * hbs])
            if bad:
                raise src._hash_fail(level, bad[0])
    if not probe:
        return src
    try:
        await src.read_at(0, p.data_block_size)
    except IntegrityError:
        raise IntegrityError(f"{name}: the superblock's block does not verify against verity.roothash="
                             f"{root.hex()} (a wrong root hash, or a damaged image)") from None
    return src
