"""dm-verity's hash tree, pure: the on-disk superblock, the tree's geometry, building and checking.

The format is exactly what ``veritysetup format`` (cryptsetup) writes and the kernel's dm-verity
reads (drivers/md/dm-verity-target.c, cryptsetup lib/verity/verity.c):

* a 512-byte superblock ``struct verity_sb`` at the hash offset (signature ``"verity\\0\\0"``,
  version 1, hash type, uuid, algorithm name, data/hash block sizes, data block count, salt);
* the hash area starts at the next hash block after it; its levels are stored top level first
  (``v->hash_level_block[]``); level 0 holds one digest per data block, level i+1 one per
  level-i hash block; each hash block holds ``hash_block_size / digest_slot`` digests (the slot is
  the digest size rounded up to a power of two), zero-padded;
* hash type 1 digests ``salt || block``; type 0 (Chrome OS) digests ``block || salt``;
* the root hash is the digest of the single top-level block, or of data block 0 itself when the
  data is one block (then the tree has no levels: ``veritysetup`` says "Hash blocks: 0").

erofs-mount appends the tree to the EROFS image (``verity-format``): data blocks = the image padded
to whole data blocks, hash offset = their size.  ``TreeState`` is the checking half: it keeps the
hash blocks verified so far (each against its parent, the top one against the root hash) and says
which ranges must be read before a data block can be checked.  No I/O here: the sources in
``verity/source.py`` read.
"""

from __future__ import annotations

import functools
import hashlib
import struct
import uuid as _uuid
from dataclasses import dataclass

from ..errors import IntegrityError, UsageError

SIGNATURE = b"verity\0\0"
SB_SIZE = 512
_SB = struct.Struct("<8sII16s32sIIQH6s256s168s")
assert _SB.size == SB_SIZE
MAX_SALT = 256
ALGORITHMS = ("sha256", "sha512", "sha1")


@dataclass(frozen=True)
class Params:
    data_blocks: int
    salt: bytes = b""
    algorithm: str = "sha256"
    data_block_size: int = 4096
    hash_block_size: int = 4096
    hash_type: int = 1
    uuid: bytes = b"\0" * 16

    def __post_init__(self) -> None:
        for name in ("data_block_size", "hash_block_size"):
            v = getattr(self, name)
            if v < 512 or v > 1 << 16 or v & (v - 1):
                raise IntegrityError(f"dm-verity {name.replace('_', ' ')} {v} is not a power of two in 512..65536")
        if self.algorithm not in ALGORITHMS:
            raise IntegrityError(f"dm-verity hash algorithm {self.algorithm!r} is not supported ({', '.join(ALGORITHMS)})")
        if self.hash_type not in (0, 1):
            raise IntegrityError(f"dm-verity hash type {self.hash_type} is unknown")
        if len(self.salt) > MAX_SALT:
            raise IntegrityError(f"dm-verity salt of {len(self.salt)} bytes (at most {MAX_SALT})")
        if self.data_blocks < 1:
            raise IntegrityError("dm-verity data block count is 0")

    @functools.cached_property
    def digest_size(self) -> int:  # asked for on every check: computed once
        return hashlib.new(self.algorithm).digest_size


def pack_superblock(p: Params) -> bytes:
    return _SB.pack(SIGNATURE, 1, p.hash_type, p.uuid, p.algorithm.encode(), p.data_block_size,
                    p.hash_block_size, p.data_blocks, len(p.salt), b"", p.salt.ljust(MAX_SALT, b"\0"), b"")


def parse_superblock(raw: bytes, where: str = "") -> Params:
    """The ``struct verity_sb`` at the start of *raw* (cryptsetup lib/verity/verity.c VERITY_read_sb)."""
    at = f" at {where}" if where else ""
    if len(raw) < SB_SIZE or raw[:8] != SIGNATURE:
        raise IntegrityError(f"no dm-verity superblock{at} (signature {bytes(raw[:8])!r})")
    (_sig, version, hash_type, uid, alg, dbs, hbs, blocks, salt_size, _p1, salt, _p2) = _SB.unpack_from(raw)
    if version != 1:
        raise IntegrityError(f"dm-verity superblock{at}: version {version} (1 is known)")
    if salt_size > MAX_SALT:
        raise IntegrityError(f"dm-verity superblock{at}: salt size {salt_size}")
    name = alg.rstrip(b"\0").decode("ascii", "replace")
    return Params(data_blocks=blocks, salt=salt[:salt_size], algorithm=name, data_block_size=dbs,
                  hash_block_size=hbs, hash_type=hash_type, uuid=uid)


class Geometry:
    """Where each level of the tree lies (``hash_start`` and positions in hash blocks)."""

    def __init__(self, p: Params, hash_start: int) -> None:
        self.p = p
        self.hash_start = hash_start  # first hash block of the tree, in hash blocks from the device start
        slot = 1 << (p.digest_size - 1).bit_length()
        if slot > p.hash_block_size:
            raise IntegrityError(f"{p.algorithm} digests do not fit a {p.hash_block_size}-byte hash block")
        self.slot = slot
        self.bits = (p.hash_block_size // slot).bit_length() - 1  # digests per hash block = 1 << bits
        levels = 0  # dm-verity-target.c verity_ctr
        while self.bits * levels < 64 and (p.data_blocks - 1) >> (self.bits * levels):
            levels += 1
        self.levels = levels
        self.level_blocks = [self.blocks_at(i) for i in range(levels)]
        self.level_start: list[int] = [0] * levels
        pos = hash_start
        for i in range(levels - 1, -1, -1):  # the top level first
            self.level_start[i] = pos
            pos += self.level_blocks[i]
        self.hash_end = pos  # one past the last hash block

    def blocks_at(self, level: int) -> int:
        shift = self.bits * (level + 1)
        return (self.p.data_blocks + (1 << shift) - 1) >> shift

    def parent(self, level: int, index: int) -> tuple[int, int, int]:
        """(hash block number, byte offset) of the digest of block *index* of *level* (level -1 = data)
        within level+1; returned as (level+1, its index, offset)."""
        return level + 1, index >> self.bits, (index & ((1 << self.bits) - 1)) * self.slot

    def block_no(self, level: int, index: int) -> int:
        return self.level_start[level] + index

    @property
    def hash_bytes(self) -> int:
        """Bytes from the superblock's offset to the end of the tree."""
        return (self.hash_end - self.hash_start) * self.p.hash_block_size


def hash_start_for(hash_offset: int, hash_block_size: int) -> int:
    """The first tree block after a superblock at *hash_offset* (cryptsetup VERITY_hash_offset_block)."""
    return (hash_offset + SB_SIZE + hash_block_size - 1) // hash_block_size


class Hasher:
    def __init__(self, p: Params) -> None:
        self.salted = p.hash_type == 1
        self.salt = p.salt
        base = hashlib.new(p.algorithm)
        if self.salted:
            base.update(p.salt)
        self.base = base

    def __call__(self, block) -> bytes:
        h = self.base.copy()
        h.update(block)
        if not self.salted:
            h.update(self.salt)
        return h.digest()


def build(p: Params, blocks) -> tuple[bytes, list[bytes]]:
    """(root hash, the hash blocks of each level from 0 up) for the data *blocks* (an iterable of
    ``data_block_size``-byte blocks, ``p.data_blocks`` of them)."""
    h = Hasher(p)
    digests = bytearray()
    n = 0
    for b in blocks:
        if len(b) != p.data_block_size:
            raise ValueError(f"data block {n} has {len(b)} bytes")
        digests += h(b)
        n += 1
    if n != p.data_blocks:
        raise ValueError(f"{n} data blocks, the parameters say {p.data_blocks}")
    return build_from_digests(p, bytes(digests))


def build_from_digests(p: Params, digests: bytes) -> tuple[bytes, list[bytes]]:
    """The same from the data blocks' digests, one after the other (``p.digest_size`` bytes each)."""
    g = Geometry(p, 0)
    h = Hasher(p)
    hbs, slot, dsz = p.hash_block_size, g.slot, p.digest_size
    if len(digests) != p.data_blocks * dsz:
        raise ValueError(f"{len(digests) // dsz} digests, the parameters say {p.data_blocks} data blocks")
    if g.levels == 0:
        return digests, []
    pad = b"\0" * (slot - dsz)
    levels: list[bytes] = []
    for _level in range(g.levels):
        # the digests of one level in slots; a hash block holds exactly 1 << bits slots, so only the
        # last one is short (zero-filled)
        out = bytearray(digests) if not pad else bytearray(b"".join(
            digests[i:i + dsz] + pad for i in range(0, len(digests), dsz)))
        out += bytes(-len(out) % hbs)
        levels.append(bytes(out))
        digests = b"".join(h(out[i:i + hbs]) for i in range(0, len(out), hbs))
    assert len(digests) == dsz
    return digests, levels


def hash_area(p: Params, levels: list[bytes]) -> bytes:
    """The bytes at the hash offset: the superblock, padding to a hash block, the levels top first."""
    head = pack_superblock(p).ljust(((SB_SIZE + p.hash_block_size - 1) // p.hash_block_size) * p.hash_block_size, b"\0")
    return head + b"".join(reversed(levels))


def new_uuid() -> bytes:
    return _uuid.uuid4().bytes


def parse_root(text: str) -> bytes:
    try:
        root = bytes.fromhex(text)
    except ValueError:
        root = b""
    if len(root) not in (20, 32, 64):
        raise UsageError(f"verity.roothash={text!r}: not a hex sha1/sha256/sha512 digest")
    return root


class TreeState:
    """The verified part of one tree: hash blocks by number, checked against their parent on entry."""

    def __init__(self, p: Params, hash_offset: int, root: bytes) -> None:
        if len(root) != p.digest_size:
            raise IntegrityError(f"the root hash has {len(root)} bytes; {p.algorithm} digests have {p.digest_size}")
        self.p = p
        self.hash_offset = hash_offset
        self.geo = Geometry(p, hash_start_for(hash_offset, p.hash_block_size))
        self.root = root
        self.hash = Hasher(p)
        self.blocks: dict[int, bytes] = {}  # verified hash blocks by block number
        self.data_size = p.data_blocks * p.data_block_size
        self.counts = {"blocks_verified": 0, "blocks_failed": 0, "hash_blocks_loaded": 0}

    # -- which hash blocks a range of data blocks needs -------------------------------------------
    def missing(self, first: int, last: int, widen: int = 1) -> tuple[int, int, int] | None:
        """The next read to make before data blocks first..last can be checked: (level, first index,
        count) of hash blocks, the highest level first (each checked against its loaded parent), or
        None when all are loaded.  Level-0 reads are widened to *widen* aligned blocks."""
        g = self.geo
        blocks = self.blocks
        if g.levels:    # asked for on every read: level 0 loaded means every level above it is (add())
            start, bits = g.level_start[0], g.bits
            a, b = first >> bits, last >> bits
            if start + a in blocks and (a == b or all(start + i in blocks for i in range(a + 1, b + 1))):
                return None
        for level in range(g.levels - 1, -1, -1):
            shift = g.bits * (level + 1)
            a, b = first >> shift, last >> shift
            start = g.level_start[level]
            if all(start + i in blocks for i in range(a, b + 1)):
                continue    # the common case, asked for every read: a few look-ups, no widening
            if level == 0 and widen > 1:
                a = a - a % widen
                b = min(g.level_blocks[0] - 1, b - b % widen + widen - 1)
            todo = [i for i in range(a, b + 1) if start + i not in blocks]
            return level, todo[0], todo[-1] - todo[0] + 1
        return None

    def byte_range(self, level: int, index: int, count: int) -> tuple[int, int]:
        hbs = self.p.hash_block_size
        return self.geo.block_no(level, index) * hbs, count * hbs

    def _expected(self, level: int, index: int) -> bytes | None:
        """The digest block *index* of *level* (-1: a data block) must have; None if its parent is not loaded."""
        g = self.geo
        if level == g.levels - 1 or g.levels == 0:
            return self.root
        plevel, pindex, off = g.parent(level, index)
        parent = self.blocks.get(g.block_no(plevel, pindex))
        if parent is None:
            return None
        return parent[off:off + self.p.digest_size]

    def add(self, level: int, index: int, data) -> list[int]:
        """Take hash blocks read from the device (*data*: whole blocks from *index* on): the good ones
        are kept; returns the indexes of those that did not match their parent."""
        hbs = self.p.hash_block_size
        bad = []
        for k in range(len(data) // hbs):
            i = index + k
            no = self.geo.block_no(level, i)
            if no in self.blocks:
                continue
            block = bytes(data[k * hbs:(k + 1) * hbs])
            want = self._expected(level, i)
            if want is None:
                raise AssertionError("hash blocks are loaded top level first")
            if self.hash(block) == want:
                self.blocks[no] = block
                self.counts["hash_blocks_loaded"] += 1
            else:
                bad.append(i)
        return bad

    def check(self, first_block: int, data, *, count: bool = True) -> list[int]:
        """Verify whole data blocks from *first_block* on (their hash blocks loaded): the numbers of the
        blocks that do not match.  *count*: add the good ones to ``blocks_verified`` (blocks a reader
        gets; a cache gate's check is not counted: its chunk is counted when read)."""
        dbs = self.p.data_block_size
        g = self.geo
        if len(data) == dbs and g.levels:  # one block (a metadata block, a small pcluster): the short way
            parent, off = self._leaf(first_block)
            if self.hash(data) == parent[off:off + self.p.digest_size]:
                if count:
                    self.counts["blocks_verified"] += 1
                return []
            return [first_block]
        mv = memoryview(data)
        n = len(mv) // dbs
        bad: list[int] = []
        if not g.levels:    # one data block: its digest is the root hash
            if n and self.hash(mv[:dbs]) != self.root:
                bad.append(first_block)
        else:
            # the hot loop (every block a reader gets): one parent look-up per hash block's worth of
            # data blocks
            bits, slot, dsz = g.bits, g.slot, self.p.digest_size
            h = self.hash
            k = 0
            while k < n:
                b = first_block + k
                parent, off = self._leaf(b)
                stop = min(n, (((b >> bits) + 1) << bits) - first_block)
                for j in range(k, stop):
                    if h(mv[j * dbs:(j + 1) * dbs]) != parent[off:off + dsz]:
                        bad.append(first_block + j)
                    off += slot
                k = stop
        if count:
            self.counts["blocks_verified"] += n - len(bad)
        return bad

    def _leaf(self, block: int) -> tuple[bytes, int]:
        """The loaded level-0 hash block that holds data block *block*'s digest, and where in it."""
        g = self.geo
        parent = self.blocks.get(g.level_start[0] + (block >> g.bits))
        if parent is None:
            raise AssertionError(f"hash block of data block {block} not loaded")
        return parent, (block & ((1 << g.bits) - 1)) * g.slot

    def ready(self, first: int, last: int) -> bool:
        """Whether data blocks first..last can be checked now (no read needed)."""
        return self.missing(first, last) is None
