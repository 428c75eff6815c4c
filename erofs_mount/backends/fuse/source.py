"""Opening a local image (and extra devices) for the FUSE daemon: an ``Image`` over ``accel/inline.LocalReader``."""

from __future__ import annotations

import os
from typing import Iterable

from ...errors import ErofsMountError, SourceError
from .accel.inline import LocalReader


class PreadFile:
    """Fallback local source (regular file): sync positional reads, used when sources/ is absent."""

    def __init__(self, path: str) -> None:
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise SourceError(f"{path}: {exc.strerror}", errno=exc.errno) from None
        self.size = os.fstat(self._fd).st_size
        self.path = path

    def pread(self, offset: int, length: int) -> bytes:
        parts, got = [], 0
        while got < length:
            chunk = os.pread(self._fd, length - got, offset + got)
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
        return b"".join(parts)

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def open_local(path: str):
    try:
        from ...sources.local import LocalSource
    except ImportError:  # the sources layer not present: a plain file reader
        return PreadFile(path)
    return LocalSource.open(path)


# The kernel caches names, attributes and file pages of a FUSE mount (long timeouts, keep_cache), so
# the daemon's own caches only need to cover what is being worked on; smaller than the reader's
# defaults to keep the daemon's memory bounded (<= 200 MB on a 60k-file image).
IMAGE_CACHES = {"inode_cache": 16384, "block_cache": 1024}
ZDATA_CACHE_BYTES = 16 << 20


def tune_image(image) -> None:
    try:
        z = image.zreader  # the compressed-data reader and its decoded-pcluster cache
    except ErofsMountError:
        return  # no compression support, or none configured: nothing to tune
    if getattr(z, "cache_limit", 0) > ZDATA_CACHE_BYTES:
        z.cache_limit = ZDATA_CACHE_BYTES


def open_image(source: str, devices: Iterable[str] = ()):
    """(Image, [opened sources]) for a local image file or block device plus extra devices.

    Must run in a worker thread or before the trio loop starts (it reads the superblock).
    """
    from ...erofs.image import Image

    opened = []
    try:
        primary = open_local(source)
        opened.append(primary)
        extra = []
        for dev in devices:
            d = open_local(dev)
            opened.append(d)
            extra.append(LocalReader(d).read_at)
        image = Image(LocalReader(primary).read_at, size=primary.size, devices=extra, **IMAGE_CACHES)
        tune_image(image)
    except BaseException:
        for src in opened:
            src.close()
        raise
    return image, opened


