"""What kind of layer a blob or a local file is (PURE).

``layer_kind(media_type)``: OCI image-spec layer media types (``application/vnd.oci.image.layer.v1.tar``,
``+gzip``, ``+zstd``, and their ``nondistributable`` twins) and Docker's
(``application/vnd.docker.image.rootfs.diff.tar.gzip``, ``…rootfs.foreign.diff.tar.gzip``) →
``"tar"``, ``"gzip"`` or ``"zstd"``; ``None`` for anything else (EROFS layers are told apart by
``sources.oci.manifest.is_erofs_media_type``).

``sniff(head)``: the first bytes of a local file → ``"gzip"`` (RFC 1952 magic 1f 8b, method 8),
``"zstd"`` (frame magic 28 b5 2f fd, RFC 8878), ``"tar"`` (a first header whose checksum is right,
POSIX.1-1988 ustar), ``"erofs"`` (the superblock magic at offset 1024) or ``None``.  A tar header is
tried before the EROFS magic: an EROFS image begins with 1024 bytes that never form a valid tar
header (zeros, or a boot sector), while a tar's first member data could hold anything at 1024.
"""

from __future__ import annotations

EROFS_SUPER_OFFSET = 1024
EROFS_MAGIC = 0xE0F5E1E2
GZIP_MAGIC = b"\x1f\x8b\x08"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
TAR_BLOCK = 512

_OCI_BASES = ("application/vnd.oci.image.layer.v1.tar", "application/vnd.oci.image.layer.nondistributable.v1.tar")
_DOCKER = {
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.diff.tar": "tar",
}
_SUFFIX = {"": "tar", "gzip": "gzip", "zstd": "zstd"}


def layer_kind(media_type: str) -> str | None:
    """``"tar"``, ``"gzip"``, ``"zstd"`` for a tar layer media type, else None."""
    mt = media_type.strip().lower()
    if mt in _DOCKER:
        return _DOCKER[mt]
    base, _, suffix = mt.partition("+")
    if base in _OCI_BASES:
        return _SUFFIX.get(suffix)
    return None


def tar_header_ok(block: bytes) -> bool:
    """A 512-byte block whose checksum field matches (unsigned or signed sum, as tar(5) allows)."""
    if len(block) < TAR_BLOCK or block[:TAR_BLOCK] == bytes(TAR_BLOCK):
        return False
    field = block[148:156]
    text = field.split(b"\0", 1)[0].strip()
    try:
        want = int(text, 8)
    except ValueError:
        return False
    head = block[:148] + b" " * 8 + block[156:TAR_BLOCK]
    unsigned = sum(head)
    signed = sum(b - 256 if b > 127 else b for b in head)
    return want in (unsigned, signed)


def sniff(head: bytes) -> str | None:
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    if tar_header_ok(head[:TAR_BLOCK]):
        return "tar"
    if len(head) >= EROFS_SUPER_OFFSET + 4 and \
            int.from_bytes(head[EROFS_SUPER_OFFSET:EROFS_SUPER_OFFSET + 4], "little") == EROFS_MAGIC:
        return "erofs"
    return None
