"""Tar layers made at test time from the corpus tree (tests/data/corpus/images/tree.tar.gz, made by
GNU tar from ``make_tree.py --seed 1``), in every shape a registry serves: the tar as GNU tar wrote
it, repacked member by member by Python's tarfile (PAX: every field survives; GNU: no xattrs, whole
seconds), gzip by the ``gzip`` command and by Python as several members, zstd as one frame and as
several.  The oracle is the kernel's manifest of erofs-utils' tar index of the same tar."""

from __future__ import annotations

import gzip
import io
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests import corpuslib

ORACLE = "tar-index-gzinfo"     # the kernel's view of tree.tar (erofs-utils --tar=i)


def oracle() -> dict:
    return corpuslib.load_manifest(corpuslib.image(ORACLE).manifest)


def repack(tar: bytes, fmt: int) -> bytes:
    """Every member of ``tar`` written again by Python's tarfile in format ``fmt``."""
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(tar)) as src, tarfile.open(fileobj=out, mode="w", format=fmt) as dst:
        for m in src:
            dst.addfile(m, src.extractfile(m) if m.isreg() else None)
    return out.getvalue()


def gzip_members(data: bytes, parts: int = 3) -> bytes:
    step = -(-len(data) // parts)
    return b"".join(gzip.compress(data[i:i + step], compresslevel=6, mtime=0) for i in range(0, len(data), step))


def zstd_frames(data: bytes, parts: int = 1) -> bytes:
    import zstandard

    step = -(-len(data) // parts)
    c = zstandard.ZstdCompressor(level=3)
    return b"".join(c.compress(data[i:i + step]) for i in range(0, len(data), step))


class Layers:
    """name → (path, kind, skip fields for the comparison)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tar = corpuslib.tree_tar().read_bytes()
        self.made: dict[str, Path] = {}

    def path(self, name: str) -> Path:
        if name not in self.made:
            self.made[name] = self._make(name)
        return self.made[name]

    def _make(self, name: str) -> Path:
        p = self.root / name
        if name == "gnutar.tar":
            p.write_bytes(self.tar)
        elif name == "gnutar.tar.gz":          # gzip, the command
            if shutil.which("gzip") is None:
                pytest.skip("gzip is not installed")
            with open(p, "wb") as f:
                subprocess.run(["gzip", "-6", "-n", "-c", str(self.path("gnutar.tar"))], stdout=f, check=True,
                               timeout=60)
        elif name == "pymembers.tar.gz":
            p.write_bytes(gzip_members(self.tar, 3))
        elif name == "pax.tar.gz":
            p.write_bytes(gzip.compress(repack(self.tar, tarfile.PAX_FORMAT), mtime=0))
        elif name == "gnu.tar":
            p.write_bytes(repack(self.tar, tarfile.GNU_FORMAT))
        elif name == "one-frame.tar.zst":
            p.write_bytes(zstd_frames(self.tar, 1))
        elif name == "frames.tar.zst":
            p.write_bytes(zstd_frames(self.tar, 4))
        else:
            raise KeyError(name)
        return p


# name → fields a format cannot carry (GNU: no xattrs, mtimes in whole seconds)
VARIANTS = {
    "gnutar.tar": (), "gnutar.tar.gz": (), "pymembers.tar.gz": (), "pax.tar.gz": (),
    "gnu.tar": ("xattrs", "mtime"), "one-frame.tar.zst": (), "frames.tar.zst": (),
}


@pytest.fixture(scope="session")
def layers(tmp_path_factory) -> Layers:
    return Layers(tmp_path_factory.mktemp("layers"))
