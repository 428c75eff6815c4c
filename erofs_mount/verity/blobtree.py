"""PURE: a dm-verity tree over a blob as it is streamed, for a blob that has no tree of its own.

A tar layer (tar, tar+gzip) is read whole once, to index it, and its bytes are checked against
the layer's digest then (``sources/tarlayer/build.py``).  Its later reads are lazy ranged GETs of
the same blob, which that digest cannot check (it covers the whole blob).  ``BlobTree`` hashes every
4 KiB block of the stream on the way; once the digest matched, the tree it makes is trusted exactly
as far as the digest is (it was computed here, from bytes that matched it), and every later read
of the blob is checked against it, block by block (``verity/anchored.py``).

The tree is dm-verity's (``veritysetup format``): sha256, 4 KiB data and hash blocks, version 1,
with an empty salt and a zero UUID, so the root hash depends on the blob's bytes alone (two mounts
of one layer agree on it, and the persistent cache's verified marks stay valid between them).  The
last data block is the blob's tail padded with zeros, as dm-verity pads a device: the data area is
the blob's size rounded up to 4 KiB.
"""

from __future__ import annotations

import hashlib

from .tree import SB_SIZE, Params, build_from_digests, hash_area

BLOCK = 4096


def params_for(size: int) -> Params:
    """The tree's parameters for a blob of *size* bytes (at least one data block)."""
    return Params(data_blocks=max(1, (size + BLOCK - 1) // BLOCK))


def hash_offset_for(size: int) -> int:
    """Where the tree's superblock goes: right after the data area (the blob padded to 4 KiB)."""
    return params_for(size).data_blocks * BLOCK


class BlobTree:
    """``feed()`` the blob's bytes in order, any piece sizes; ``finish()`` gives the root hash and
    the hash area (superblock, padding, levels top first) to put at ``hash_offset``."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.p = params_for(size)
        self.hash_offset = hash_offset_for(size)
        # sha256 with an empty salt (version 1: salt first) is sha256 of the block itself: called
        # directly (~16 % less than tree.Hasher's copy of a salted base per block)
        assert self.p.algorithm == "sha256" and not self.p.salt and self.p.hash_type == 1
        self._digests = bytearray()
        self._rest = b""     # the start of a block the last piece did not finish
        self._fed = 0

    def feed(self, data) -> None:
        digests, sha256 = self._digests, hashlib.sha256
        mv = memoryview(data)
        self._fed += len(mv)
        if self._rest:
            need = BLOCK - len(self._rest)
            if len(mv) < need:
                self._rest += bytes(mv)
                return
            digests += sha256(self._rest + bytes(mv[:need])).digest()
            mv = mv[need:]
            self._rest = b""
        whole = len(mv) - len(mv) % BLOCK
        for i in range(0, whole, BLOCK):
            digests += sha256(mv[i:i + BLOCK]).digest()
        if whole < len(mv):
            self._rest = bytes(mv[whole:])

    def finish(self) -> tuple[bytes, bytes]:
        """(root hash, hash area).  Raises ValueError when the stream was not the blob's size."""
        if self._fed != self.size:
            raise ValueError(f"{self._fed} bytes hashed, the blob has {self.size}")
        if self._rest or not self._digests:
            self._digests += hashlib.sha256(self._rest.ljust(BLOCK, b"\0")).digest()
            self._rest = b""
        root, levels = build_from_digests(self.p, bytes(self._digests))
        area = hash_area(self.p, levels)
        assert len(area) >= SB_SIZE
        return root, area
