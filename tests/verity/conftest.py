"""Verified reads against a real docker-registry of its own (its storage is damaged on purpose, so it
is not the shared ``world`` of tests/oci): corpus images with a dm-verity tree appended
(``verity-format``), pushed with the root-hash annotation, and a fault proxy in front."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from erofs_mount.verity.format import ANNOTATION_ROOT, format_image
from tests import corpuslib
from tests.oci._faultproxy import proxy_thread
from tests.oci._servers import REGISTRY_BIN, Pusher, Registry, sha256, start_registry

MT = "application/vnd.erofs"
NAMES = ("plain-inline-4k", "lz4")


@dataclass
class Formatted:
    name: str
    path: Path          # the image with its tree
    raw: bytes
    root: str
    offset: int
    digest: str = ""
    manifest: str = ""  # the manifest digest (a reference pinned by it trusts the annotation)


@dataclass
class VerityWorld:
    root: Path
    storage: Path
    registry: Registry
    images: dict = field(default_factory=dict)

    def ref(self, name: str, *, pinned: bool = True, host: str | None = None) -> str:
        img = self.images[name]
        base = f"{host or self.registry.host}/verity/{name}"
        return f"{base}@{img.manifest}" if pinned else f"{base}:v1"

    def blob_file(self, digest: str) -> Path:
        hexd = digest.split(":", 1)[1]
        return self.storage / "docker" / "registry" / "v2" / "blobs" / "sha256" / hexd[:2] / hexd / "data"


def format_copy(name: str, dest: Path) -> Formatted:
    path = dest / f"{name}.erofs"
    shutil.copyfile(corpuslib.image(name).path, path)
    root, offset, _ = format_image(str(path), salt=b"erofs-mount tests")
    return Formatted(name, path, path.read_bytes(), root.hex(), offset)


def file_offset(raw: bytes, manifest: dict, min_size: int = 64 << 10) -> tuple[str, int]:
    """(a regular file of at least *min_size* bytes, the image offset of its byte 5000) in an
    uncompressed image: its first 4 KiB found in the image."""
    for path, rec in sorted(manifest["entries"].items()):
        if rec.get("type") == "reg" and rec.get("size", 0) >= min_size and path in corpuslib.source_files():
            head = corpuslib.source_bytes(path, 0, 4096)
            at = raw.find(head)
            if at >= 0 and raw.find(head, at + 1) < 0:
                return path, at + 5000
    raise AssertionError("no large file with unique contents")


@pytest.fixture(scope="session")
def vworld(tmp_path_factory) -> VerityWorld:
    if REGISTRY_BIN is None:
        pytest.skip("docker-registry is not installed")
    root = tmp_path_factory.mktemp("verity")
    storage = root / "storage"
    reg = start_registry(root / "reg", storage)
    w = VerityWorld(root, storage, reg)
    p = Pusher(reg.url)
    try:
        for name in NAMES:
            f = format_copy(name, root)
            f.digest = sha256(f.raw)
            f.manifest, _ = p.image(f"verity/{name}", "v1", [(MT, f.raw, {ANNOTATION_ROOT: f.root})])
            w.images[name] = f
        yield w
    finally:
        p.close()
        reg.stop()


@pytest.fixture
def proxy(vworld):
    yield from proxy_thread(vworld.registry.port)
