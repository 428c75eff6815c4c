"""PURE: where a mount's dm-verity root hash comes from, and whether verification is required.

Options (``-o``):

* ``verity.roothash=HEX`` — the root hash, as ``verity-format`` or ``veritysetup format`` printed it;
* ``verity.hashoffset=N`` — where the tree's superblock is (default: after the EROFS image, rounded
  up to 4 KiB, which is where ``verity-format`` puts it);
* ``verity=auto|require|off`` — ``auto`` (default) verifies when a trusted root hash is known;
  ``require`` refuses to mount without one; ``off`` never verifies (a root hash given is an error).

A root hash is trusted when it is on the command line, or when it is the layer descriptor's
annotation ``org.erofs-mount.verity.roothash`` (+ ``org.erofs-mount.verity.hashoffset``) in a
manifest that was resolved by digest (``REF@sha256:…``: the manifest's bytes are checked against the
digest, so the annotation is as trustworthy as the digest the user typed).  An annotation reached
through a tag is not (the registry chose the manifest): ``auto`` ignores it with a warning,
``require`` fails.

A tar layer has no tree of its own: the pass that indexes it makes one of the blob, checked against
the layer's digest (``tar_choice``; ``verity/blobtree.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UsageError
from .format import ANNOTATION_OFFSET, ANNOTATION_ROOT
from .tree import parse_root

MODES = ("auto", "require", "off")


def parse_mode(name: str, value: str | None) -> str:
    v = (value or "auto").strip().lower()
    v = {"on": "require", "yes": "require", "1": "require", "no": "off", "0": "off", "none": "off"}.get(v, v)
    if v not in MODES:
        raise UsageError(f"invalid {name}={value!r}: expected auto, require or off")
    return v


def parse_roothash(name: str, value: str | None) -> str:
    if not value:
        raise UsageError(f"option {name} needs a value ({name}=HEX)")
    parse_root(value.strip())
    return value.strip().lower()


def parse_offset(name: str, value: str | None) -> int:
    try:
        n = int(value or "", 0)
    except ValueError:
        raise UsageError(f"invalid {name}={value!r}: expected a byte offset") from None
    if n < 0 or n % 512:
        raise UsageError(f"invalid {name}={value!r}: a non-negative multiple of 512")
    return n


@dataclass(frozen=True)
class Choice:
    """What to verify with: the root hash and where the tree is (None: after the image)."""

    root: bytes
    hash_offset: int | None
    origin: str  # "verity.roothash" or "annotation"


def choose(mode: str, roothash: str | None, hash_offset: int | None, *, annotations: dict | None = None,
           pinned: bool = False, what: str = "image") -> tuple[Choice | None, str | None]:
    """(the root hash to verify with or None, a warning to log or None); raises UsageError when
    ``require`` finds no trusted root hash or the options contradict each other."""
    if mode == "off":
        if roothash or hash_offset is not None:
            raise UsageError("verity=off contradicts verity.roothash/verity.hashoffset")
        return None, None
    if roothash:
        return Choice(parse_root(roothash), hash_offset, "verity.roothash"), None
    ann = (annotations or {}).get(ANNOTATION_ROOT)
    if ann:
        if not pinned:
            msg = (f"{what}: the layer's {ANNOTATION_ROOT} comes from a manifest resolved by tag, which the "
                   f"registry chose: not trusted (pin the reference by digest, REF@sha256:…, or give verity.roothash=)")
            if mode == "require":
                raise UsageError(msg)
            return None, msg + "; reading unverified"
        try:
            root = parse_root(ann)
            off = annotations.get(ANNOTATION_OFFSET)
            offset = hash_offset if hash_offset is not None else (parse_offset(ANNOTATION_OFFSET, off) if off else None)
        except UsageError as exc:
            raise UsageError(f"{what}: bad verity annotation: {exc}") from None
        return Choice(root, offset, "annotation"), None
    if mode == "require":
        raise UsageError(f"{what}: verity=require but no trusted root hash (give verity.roothash=, or pin by "
                         f"digest an image whose layer carries {ANNOTATION_ROOT})")
    return None, None


def tar_choice(mode: str, roothash: str | None, hash_offset: int | None, *, pinned: bool, indexed: bool,
               what: str, media_type: str) -> bool:
    """Whether a tar layer's reads are checked against the tree its indexing pass makes of the blob
    (``verity/anchored.py``): a tree anchored in the layer's digest, as trusted as the manifest that
    named it; ``require`` wants that manifest pinned by digest (*pinned*: or the blob named by it)
    and the pass made here (*indexed*: not ``oci.tarindex=``, an index made elsewhere)."""
    if roothash or hash_offset is not None:
        raise UsageError(f"{what} is a {media_type} layer: verity.roothash= and verity.hashoffset= are for "
                         f"EROFS layers (a tar layer is checked block by block against its digest)")
    if mode == "require" and not pinned:
        raise UsageError(f"{what}: verity=require: a tar layer is checked against its digest, which a manifest "
                         f"resolved by tag does not pin (pin the reference by digest, REF@sha256:…)")
    if mode == "require" and not indexed:
        raise UsageError(f"{what}: verity=require: with oci.tarindex the layer is not indexed here, so "
                         f"there is no tree of its blob to check reads against")
    return mode != "off" and indexed
