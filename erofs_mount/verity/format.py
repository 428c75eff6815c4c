"""``erofs-mount verity-format IMAGE``: append a dm-verity hash tree to an EROFS image file.

The image is padded with zeros to whole 4 KiB data blocks (the EROFS superblock's block count says
where the filesystem ends; nothing reads the padding), then the superblock and the tree follow at
that offset, exactly as ``veritysetup format IMAGE IMAGE --hash-offset=N`` writes them, so
``veritysetup verify/open`` and the kernel take the result as is.  Prints the root hash: the value
to pin (``-o verity.roothash=``, or the layer annotation ``ANNOTATION_ROOT``).
"""

from __future__ import annotations

import os

from ..errors import ImageError, UsageError
from .tree import SB_SIZE, SIGNATURE, Params, build, hash_area, new_uuid

ANNOTATION_ROOT = "org.erofs-mount.verity.roothash"
ANNOTATION_OFFSET = "org.erofs-mount.verity.hashoffset"
BLOCK = 4096


def erofs_size(path: str) -> int:
    from ..erofs.superblock import parse_superblock

    with open(path, "rb") as f:
        head = f.read(BLOCK)
    try:
        sb = parse_superblock(head)
    except ImageError as exc:
        raise ImageError(f"{path}: {exc}") from None
    return sb.blocks << sb.blkszbits


def format_image(path: str, *, salt: bytes | None = None, uuid: bytes | None = None,
                 force: bool = False) -> tuple[bytes, int, Params]:
    """Append the tree in place; (root hash, hash offset, parameters)."""
    size = erofs_size(path)
    data_size = (size + BLOCK - 1) // BLOCK * BLOCK
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        have = os.fstat(fd).st_size
        if have < size:
            raise ImageError(f"{path}: truncated: {have} bytes, the superblock says {size}")
        if have > data_size:
            if os.pread(fd, len(SIGNATURE), data_size) == SIGNATURE and not force:
                raise UsageError(f"{path}: a dm-verity tree is already at byte {data_size} (--force to replace it)")
            if not force:
                raise UsageError(f"{path}: {have - size} bytes after the EROFS image (--force to replace them)")
        os.ftruncate(fd, data_size)
        p = Params(data_blocks=data_size // BLOCK, salt=os.urandom(32) if salt is None else salt,
                   uuid=uuid or new_uuid())

        def blocks():
            pos = 0
            while pos < data_size:
                chunk = os.pread(fd, min(8 << 20, data_size - pos), pos)
                if not chunk:
                    raise ImageError(f"{path}: short read at {pos}")
                for i in range(0, len(chunk), BLOCK):
                    yield chunk[i:i + BLOCK]
                pos += len(chunk)
        root, levels = build(p, blocks())
        area = hash_area(p, levels)
        assert len(area) >= SB_SIZE
        if os.pwrite(fd, area, data_size) != len(area):
            raise OSError(f"{path}: short write of the hash tree")
        os.fsync(fd)
        return root, data_size, p
    finally:
        os.close(fd)


def format_lines(path: str, root: bytes, offset: int, p: Params) -> list[str]:
    return [
        f"image:        {path}",
        f"data blocks:  {p.data_blocks} x {p.data_block_size}",
        f"hash offset:  {offset}",
        f"hash:         {p.algorithm}, salt {p.salt.hex() or '-'}",
        f"root hash:    {root.hex()}",
        f"mount with:   -o verity.roothash={root.hex()}",
        f"annotation:   {ANNOTATION_ROOT}={root.hex()}",
    ]
