"""The merge rules, pure: whiteouts, opaque directories, one directory's merged listing, inode numbers.

Rules (OCI image spec, "Applying Changesets", and overlayfs), for a directory present in layers
``L_top > ... > L_bottom`` (its *components*, topmost first):

* A name's owner is the topmost component that has it, unless a higher component whites it out.
  A whiteout in component L hides the name in the components BELOW L only: an entry of L itself
  with that name stays (the spec: "files present in the same layer as a whiteout file can only be
  hidden by whiteout files in subsequent layers").
* Whiteouts, honoured in every layer whatever its origin:
  - an entry ``.wh.NAME`` (OCI tar layers; erofs-mount's tar index keeps them as ordinary entries)
    of any type; ``NAME`` empty, ``.``, ``..`` or holding ``/`` or NUL is ignored (no effect);
  - a character device 0/0 named ``NAME`` (overlayfs; ``mkfs.erofs --tar``/``--oci``).
* Opaque: an entry ``.wh..wh..opq`` in component L, or the xattr ``trusted.overlay.opaque`` or
  ``user.overlay.opaque`` = ``b"y"`` on L's directory: the components below L do not contribute.
  L's own entries stay.  (overlayfs' ``"x"``, "may hold xwhiteouts", is not opaque.)
* A name that is a directory in its owner merges with the same name in lower components while
  they have a directory there; a non-directory or a whiteout in some component ends it (that
  component's entry and everything below are hidden).  A non-directory owner hides everything below.
* Never shown: ``.wh.*`` entries (whiteouts, the opaque marker, aufs' ``.wh..wh.*``), whiteout
  devices, ``.``/``..`` and names no directory entry may hold (empty, ``/``, NUL): a hostile layer
  can name nothing outside its directory.

Types come from the directory entries' file type (like overlayfs' readdir merge); only a
character device's inode is read, to tell a whiteout (rdev 0) from a device.

Inode numbers: a non-directory is (layer, its nid in that layer); a merged directory is its topmost
component.  One int holds both: ``key << 6 | layer`` where ``key`` is the layer's ``st_ino`` of the
nid (the nid itself, or the kernel's 64-bit folding on metabox images), so at most 64 layers
(:data:`MAX_LAYERS`) and keys below 2**57 (images up to 2**62 bytes of inode slots).  Hard links
within a layer share one number.  The merged image has no metabox, so ``st_ino`` is that number.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from ..erofs import layout as L
from ..erofs.superblock import Superblock
from ..errors import CorruptedError, StaleError, UnsupportedError

LAYER_BITS = 6
MAX_LAYERS = 1 << LAYER_BITS
MAX_KEY = 1 << 57
WH_PREFIX = b".wh."
OPAQUE_MARKER = b".wh..wh..opq"
OPAQUE_XATTRS = (b"trusted.overlay.opaque", b"user.overlay.opaque")
# overlayfs keeps its own xattrs from users (ovl_is_private_xattr; user.overlay.* with -o userxattr):
# the merged view hides both namespaces, on every inode
PRIVATE_XATTR_PREFIXES = (b"trusted.overlay.", b"user.overlay.")
_NID_MASK = (1 << 63) - 1


# ---------------------------------------------------------------------------- inode numbers
def check_layer_count(n: int) -> None:
    if n < 1:
        raise UnsupportedError("a merged image needs at least one layer")
    if n > MAX_LAYERS:
        raise UnsupportedError(f"{n} layers: the merged view numbers inodes for at most {MAX_LAYERS} layers")


def fold_nid(nid: int, metabox: bool) -> int:
    """A layer's nid as its ``st_ino`` (``Image.st_ino``: fs/erofs/internal.h ``erofs_nid_to_ino64``)."""
    if not metabox:
        return nid
    x = nid & _NID_MASK
    return ((x >> 31) << 32) | ((nid >> 63) << 31) | (x & 0x7FFFFFFF)


def unfold_ino(ino: int, metabox: bool) -> int:
    """The inverse of :func:`fold_nid`."""
    if not metabox:
        return ino
    return ((ino >> 32) << 31) | (ino & 0x7FFFFFFF) | (((ino >> 31) & 1) << 63)


def encode_nid(layer: int, key: int) -> int:
    """The merged nid of the inode whose (folded) layer nid is ``key`` in layer ``layer``."""
    if not 0 <= key < MAX_KEY:
        raise CorruptedError(f"layer {layer}: nid {key} too large for the merged inode numbering")
    return (key << LAYER_BITS) | layer


def decode_nid(nid: int, layers: int) -> tuple[int, int]:
    """``(layer, key)`` of a merged nid; ``StaleError`` if it names no layer."""
    layer = nid & (MAX_LAYERS - 1)
    if nid < 0 or layer >= layers:
        raise StaleError(f"merged nid {nid} names no layer (there are {layers})")
    return layer, nid >> LAYER_BITS


# ---------------------------------------------------------------------------- names
def valid_name(name: bytes) -> bool:
    """A name one directory entry may hold: not empty, ``.``, ``..``, nor with ``/`` or NUL."""
    return bool(name) and name not in (b".", b"..") and b"/" not in name and b"\0" not in name


def whiteout_target(name: bytes) -> bytes | None:
    """The name an OCI whiteout entry ``.wh.NAME`` removes; None for the opaque marker, for names
    that are not whiteouts and for hostile targets (empty, ``.``, ``..``, ``/``, NUL)."""
    if not name.startswith(WH_PREFIX) or name == OPAQUE_MARKER:
        return None
    target = name[len(WH_PREFIX):]
    return target if valid_name(target) else None


def is_opaque_xattrs(items: Iterable[tuple[bytes, bytes]]) -> bool:
    return any(n in OPAQUE_XATTRS and v == b"y" for n, v in items)


def is_private_xattr(name: bytes) -> bool:
    return name.startswith(PRIVATE_XATTR_PREFIXES)


# ---------------------------------------------------------------------------- one directory
class Component(Protocol):
    """One layer's version of a directory, read only when the merge gets to it."""

    def opaque_attr(self) -> bool:
        """Whether the directory carries an opaque xattr."""

    def entries(self) -> Iterable[tuple[bytes, int, int]]:
        """``(name, merged nid, EROFS_FT_*)`` of every entry, ``.`` and ``..`` included or not."""

    def is_whiteout(self, nid: int) -> bool:
        """Whether the character device with merged nid ``nid`` is a whiteout (rdev 0/0)."""


@dataclass(slots=True)
class Listing:
    """A merged directory: visible names sorted bytewise, each ``(merged nid, EROFS_FT_*)``; the
    components of each visible subdirectory (merged nids, topmost first; emptied once the image
    has recorded them); how many components were read; how many subdirectories there are."""

    names: list[bytes]
    entries: dict[bytes, tuple[int, int]]
    subdirs: dict[bytes, tuple[int, ...]]
    read: int
    nsubdirs: int


def merge_dir(components: Iterable[Component]) -> Listing:
    """The merged listing of one directory from its components, topmost first.  Components are
    taken one at a time and no further once one is opaque."""
    owner: dict[bytes, tuple[int, int]] = {}
    dirs: dict[bytes, list[int]] = {}
    closed: set[bytes] = set()          # names no lower component may add to
    read = 0
    for comp in components:
        read += 1
        opaque = comp.opaque_attr()
        closing: list[bytes] = []       # whiteouts and non-directories of this component
        for name, nid, ftype in comp.entries():
            if not valid_name(name):
                continue
            if name.startswith(WH_PREFIX):
                if name == OPAQUE_MARKER:
                    opaque = True
                else:
                    target = whiteout_target(name)
                    if target is not None:
                        closing.append(target)
                continue
            if ftype == L.EROFS_FT_CHRDEV and comp.is_whiteout(nid):
                closing.append(name)
                continue
            is_dir = ftype == L.EROFS_FT_DIR
            if not is_dir:
                closing.append(name)
            if name in closed:
                continue
            if name not in owner:
                owner[name] = (nid, ftype)
                if is_dir:
                    dirs[name] = [nid]
            elif is_dir and name in dirs:
                dirs[name].append(nid)
        closed.update(closing)
        if opaque:
            break
    return Listing(sorted(owner), owner, {n: tuple(c) for n, c in dirs.items()}, read, len(dirs))


# ---------------------------------------------------------------------------- the superblock
def merged_superblock(sbs: list[Superblock], root_nid: int, blkszbits: int, blocks: int) -> Superblock:
    """A superblock describing the merged view: the topmost layer's, with the root, the counts
    added up (``inos``; ``blocks`` in units of ``2**blkszbits``), no metabox, devices, packed
    inode or prefix table of its own, and the data features of ALL layers: ``lz4_only`` holds
    only if it holds for every layer, ``marks_compression`` if it does for any."""
    top = sbs[-1]
    incompat = 0
    algs = 0
    lz4_dist = 0
    for sb in sbs:
        incompat |= sb.feature_incompat
        if sb.has_incompat(L.EROFS_FEATURE_INCOMPAT_COMPR_CFGS):
            algs |= sb.available_compr_algs
        else:
            lz4_dist = max(lz4_dist, sb.available_compr_algs)
            if sb.marks_compression:
                algs |= 1   # lz4
    incompat &= ~(L.EROFS_FEATURE_INCOMPAT_METABOX | L.EROFS_FEATURE_INCOMPAT_DEVICE_TABLE)
    if not incompat & L.EROFS_FEATURE_INCOMPAT_COMPR_CFGS:
        algs = lz4_dist
    compat = top.feature_compat
    for sb in sbs:
        compat &= sb.feature_compat
    compat &= ~(L.EROFS_FEATURE_COMPAT_PLAIN_XATTR_PFX | L.EROFS_FEATURE_COMPAT_SHARED_EA_IN_METABOX)
    oks = [sb.checksum_ok for sb in sbs]
    return dataclasses.replace(
        top, root_nid=root_nid, inos=sum(sb.inos for sb in sbs), blkszbits=blkszbits, blocks=blocks,
        feature_incompat=incompat, feature_compat=compat, available_compr_algs=algs, extra_devices=0,
        devt_slotoff=0, devices=(), metabox_nid=0, packed_nid=0, xattr_prefix_count=0, xattr_prefix_start=0,
        checksum_ok=None if None in oks else all(oks))
