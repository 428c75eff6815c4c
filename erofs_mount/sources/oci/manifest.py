"""Manifests, platforms and layer selection (PURE: no I/O).

Media types and field names from the OCI image spec (``image-index.md``,
``manifest.md``, ``descriptor.md``) and Docker's image manifest v2 schema 2.
"""

from __future__ import annotations

import hashlib
import json
import platform as _platform
from dataclasses import dataclass, field

from ...errors import NotErofsError, RegistryError, UnsupportedError, UsageError
from .reference import parse_digest

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
# Send all four: without the OCI types distribution 404s an OCI manifest, and
# with Docker v2 alone it silently resolves a list to amd64.
ACCEPT = ", ".join((OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST))

EROFS_MEDIA_TYPES = ("application/vnd.erofs", "application/vnd.erofs.layer.v1")
EROFS_MAGIC = 0xE0F5E1E2
EROFS_SUPER_OFFSET = 1024

# Python's platform.machine() → GOARCH (and default variant).
_ARCH = {
    "x86_64": ("amd64", None),
    "amd64": ("amd64", None),
    "aarch64": ("arm64", "v8"),
    "arm64": ("arm64", "v8"),
    "armv7l": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "i386": ("386", None),
    "i686": ("386", None),
    "ppc64le": ("ppc64le", None),
    "s390x": ("s390x", None),
    "riscv64": ("riscv64", None),
}


@dataclass(frozen=True, slots=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    def __str__(self) -> str:
        out = f"{self.os}/{self.architecture}"
        return f"{out}/{self.variant}" if self.variant else out


def normalize_platform(os_: str, arch: str, variant: str | None) -> Platform:
    """containerd's platforms.Normalize, the parts that matter: arm64 ⇒ v8."""
    os_, arch = os_.lower(), arch.lower()
    variant = variant.lower() if variant else None
    if arch in ("aarch64", "arm64"):
        arch = "arm64"
        variant = variant or "v8"
        if variant == "8":
            variant = "v8"
    elif arch in ("x86_64", "x86-64"):
        arch = "amd64"
        variant = None if variant in (None, "v1") else variant
    elif arch in ("i386", "i686"):
        arch = "386"
    elif arch.startswith("armv") and arch[4:].isdigit():
        variant, arch = f"v{arch[4:]}", "arm"
    elif arch == "arm" and variant and variant.isdigit():
        variant = f"v{variant}"
    return Platform(os_, arch, variant)


def parse_platform(text: str) -> Platform:
    """``os/arch[/variant]`` → Platform; UsageError naming the bad value."""
    parts = text.strip().split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise UsageError(f"invalid oci.platform {text!r}: expected os/arch[/variant], e.g. linux/arm64/v8")
    return normalize_platform(parts[0], parts[1], parts[2] if len(parts) == 3 else None)


def host_platform() -> Platform:
    arch, variant = _ARCH.get(_platform.machine().lower(), (_platform.machine().lower(), None))
    return normalize_platform("linux", arch, variant)


@dataclass(frozen=True, slots=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    platform: Platform | None = None
    os_features: tuple[str, ...] = ()
    annotations: dict = field(default_factory=dict, hash=False, compare=False)


@dataclass(frozen=True, slots=True)
class Index:
    media_type: str
    manifests: tuple[Descriptor, ...]


@dataclass(frozen=True, slots=True)
class Manifest:
    media_type: str
    config: Descriptor | None
    layers: tuple[Descriptor, ...]


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def verify_digest(data: bytes, digest: str) -> None:
    algo, _, want = digest.partition(":")
    try:
        got = hashlib.new(algo, data).hexdigest()
    except ValueError:
        raise RegistryError(f"unsupported digest algorithm in {digest}") from None
    if got != want:
        raise RegistryError(f"content does not match its digest {digest} (got {algo}:{got})")


def _descriptor(obj: object, where: str) -> Descriptor:
    if not isinstance(obj, dict):
        raise RegistryError(f"{where}: descriptor is not an object")
    try:
        media_type = obj.get("mediaType", "")
        digest = parse_digest(obj["digest"])
        size = obj["size"]
    except (KeyError, UsageError) as exc:
        raise RegistryError(f"{where}: bad descriptor ({exc})") from None
    if not isinstance(size, int) or size < 0 or not isinstance(media_type, str):
        raise RegistryError(f"{where}: bad descriptor size or media type")
    plat = None
    features: tuple[str, ...] = ()
    p = obj.get("platform")
    if isinstance(p, dict) and isinstance(p.get("os"), str) and isinstance(p.get("architecture"), str):
        variant = p.get("variant") if isinstance(p.get("variant"), str) else None
        plat = normalize_platform(p["os"], p["architecture"], variant)
        feats = p.get("os.features") or []
        features = tuple(f for f in feats if isinstance(f, str)) if isinstance(feats, list) else ()
    ann = obj.get("annotations") if isinstance(obj.get("annotations"), dict) else {}
    return Descriptor(media_type, digest, size, plat, features, ann)


def parse_manifest(data: bytes, content_type: str | None) -> Index | Manifest:
    """Parse an index/list or a manifest; the body's mediaType wins over the header."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RegistryError(f"manifest is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise RegistryError("manifest is not a JSON object")
    media_type = doc.get("mediaType") or (content_type or "").split(";")[0].strip()
    if not media_type:
        # OCI allows mediaType to be absent: decide by the fields present.
        media_type = OCI_INDEX if "manifests" in doc else OCI_MANIFEST
    if media_type in INDEX_TYPES:
        items = doc.get("manifests")
        if not isinstance(items, list):
            raise RegistryError(f"{media_type}: no manifests list")
        return Index(media_type, tuple(_descriptor(m, f"manifests[{i}]") for i, m in enumerate(items)))
    if media_type in MANIFEST_TYPES:
        layers = doc.get("layers")
        if not isinstance(layers, list):
            raise RegistryError(f"{media_type}: no layers list")
        config = _descriptor(doc["config"], "config") if "config" in doc else None
        return Manifest(media_type, config, tuple(_descriptor(l, f"layers[{i}]") for i, l in enumerate(layers)))
    raise RegistryError(f"unsupported manifest media type {media_type!r}")


def _platform_matches(have: Platform, want: Platform) -> bool:
    if (have.os, have.architecture) != (want.os, want.architecture):
        return False
    if want.variant is None:
        return True
    return have.variant == want.variant


def select_platform(index: Index, want: Platform) -> Descriptor:
    """The index entry for *want*; entries whose os.features hold ``erofs`` first."""
    candidates = [
        d for d in index.manifests
        if d.platform is not None and d.media_type in MANIFEST_TYPES + ("",) and _platform_matches(d.platform, want)
    ]
    if not candidates:
        have = sorted({str(d.platform) for d in index.manifests if d.platform is not None})
        raise RegistryError(
            f"no manifest for platform {want} in the index (available: {', '.join(have) or 'none'});"
            " choose one with -o oci.platform=os/arch[/variant]"
        )
    candidates.sort(key=lambda d: "erofs" not in d.os_features)  # stable: keeps index order
    return candidates[0]


def select_layer(manifest: Manifest, *, layer: int | None, blob: str | None) -> tuple[int, Descriptor]:
    """(index, descriptor) of the layer named by oci.layer or oci.blob."""
    n = len(manifest.layers)
    if layer is not None and blob is not None:
        raise UsageError("oci.layer and oci.blob cannot be set together")
    if blob is not None:
        for i, d in enumerate(manifest.layers):
            if d.digest == blob:
                return i, d
        raise RegistryError(f"blob {blob} is not a layer of this image ({n} layers)")
    if layer is not None:
        if not 0 <= layer < n:
            raise UsageError(f"oci.layer={layer} out of range: the image has {n} layer{'s' if n != 1 else ''}")
        return layer, manifest.layers[layer]
    if n == 1:
        return 0, manifest.layers[0]
    erofs = [(i, d) for i, d in enumerate(manifest.layers) if is_erofs_media_type(d.media_type)]
    if len(erofs) == 1:
        return erofs[0]
    raise UsageError(f"the image has {n} layers: choose one with -o oci.layer=0..{n - 1} or -o oci.blob=sha256:… "
                     "(NBD mode serves one layer; FUSE mode and the tools merge them all)")


def is_erofs_media_type(media_type: str) -> bool:
    base = media_type.split("+")[0]
    return base in EROFS_MEDIA_TYPES or base.endswith(".erofs")


def check_layer_media_type(desc: Descriptor) -> None:
    """Refuse anything that is not an EROFS layer, naming its type.

    ``+zstd`` passes here: whether the blob carries the zstd seek table that random
    access needs is known only from its tail (``zstdsource.open_zstd_layer`` refuses
    it otherwise); any other ``+suffix`` is refused."""
    mt = desc.media_type
    _, plus, suffix = mt.partition("+")
    if not is_erofs_media_type(mt):
        raise UnsupportedError(
            f"layer {desc.digest} has media type {mt!r}, not an EROFS image"
            " (application/vnd.erofs or *.erofs expected)"
        )
    if plus and suffix != "zstd":
        raise UnsupportedError(f"layer {desc.digest} has unsupported EROFS media type {mt!r}")


def check_erofs_magic(head: bytes, what: str) -> None:
    """*head* = the first >= 1028 bytes of the blob."""
    if len(head) < EROFS_SUPER_OFFSET + 4:
        raise NotErofsError(f"{what}: too short to be an EROFS image ({len(head)} bytes)")
    magic = int.from_bytes(head[EROFS_SUPER_OFFSET : EROFS_SUPER_OFFSET + 4], "little")
    if magic != EROFS_MAGIC:
        raise NotErofsError(f"{what}: no EROFS superblock magic at offset 1024 (found {magic:#010x})")
