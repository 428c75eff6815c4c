"""Resolving a reference once: tag → (index →) manifest, with every digest pinned; ``oci-inspect``.

``resolve()`` is the only place that follows tags: everything after it uses
digests, so a tag moved under a live mount changes nothing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import trio

from ...errors import RegistryError
from .client import RegistryClient
from .mirrored import MirroredClient
from .manifest import Index, Manifest, host_platform, is_erofs_media_type, parse_manifest, parse_platform, select_platform
from .options import OciOptions
from .reference import Reference, parse_reference


@dataclass(frozen=True, slots=True)
class Resolution:
    ref: Reference  # the reference pinned to the top-level digest (index or manifest)
    top_digest: str
    top_media_type: str
    platform: str  # the platform chosen from the index, or the one asked for / this host's
    manifest_digest: str  # the image manifest's digest (== top_digest without an index)
    manifest: Manifest
    index: Index | None


def options_with(options: OciOptions | None, *, layer: int | None = None, blob: str | None = None,
                 platform: str | None = None) -> OciOptions:
    """*options* with explicit keyword choices applied (layer and blob replace each other)."""
    options = options or OciOptions()
    changes: dict = {k: v for k, v in (("layer", layer), ("blob", blob), ("platform", platform)) if v is not None}
    if not changes:
        return options
    if "layer" in changes:
        changes.setdefault("blob", None)
    elif "blob" in changes:
        changes.setdefault("layer", None)
    out = dataclasses.replace(options, **changes)
    out.validate()
    return out


async def resolve(client: RegistryClient, ref: Reference, options: OciOptions) -> Resolution:
    body, ctype, top_digest = await client.get_manifest(ref.reference)
    doc = parse_manifest(body, ctype)
    top_type = doc.media_type
    want = parse_platform(options.platform) if options.platform else host_platform()
    plat, manifest_digest, index = str(want), top_digest, None
    if isinstance(doc, Index):
        index = doc
        entry = select_platform(doc, want)
        plat = str(entry.platform)
        body, ctype, manifest_digest = await client.get_manifest(entry.digest)
        doc = parse_manifest(body, ctype)
        if not isinstance(doc, Manifest):
            raise RegistryError(f"{ref}: index entry {entry.digest} is not an image manifest")
    return Resolution(ref.with_digest(top_digest), top_digest, top_type, plat, manifest_digest, doc, index)


def inspection_lines(res: Resolution) -> list[str]:
    """Human-readable lines for ``erofs-mount oci-inspect``."""
    out = [f"reference: {res.ref}", f"digest: {res.top_digest}", f"media-type: {res.top_media_type}"]
    if res.index is not None:
        out.append("platforms: " + ", ".join(str(d.platform) for d in res.index.manifests if d.platform))
        out.append(f"manifest: {res.manifest_digest} ({res.manifest.media_type})")
    out.append(f"platform: {res.platform}")
    from ..tarlayer.kinds import layer_kind

    for i, d in enumerate(res.manifest.layers):
        tar = layer_kind(d.media_type)
        mark = "erofs" if is_erofs_media_type(d.media_type) else ("tar" if tar == "tar" else
                                                                   f"tar+{tar}" if tar else "-")
        out.append(f"layer {i}: {d.digest} {d.size} {d.media_type} {mark}")
    return out


async def inspect_oci(ref: str | Reference, *, options: OciOptions | None = None, platform: str | None = None,
                      env: dict | None = None) -> Resolution:
    """Resolve *ref* (for ``oci-inspect``) and close the connection again."""
    options = options_with(options, platform=platform)
    if isinstance(ref, str):
        ref = parse_reference(ref)
    client = MirroredClient(ref, options, env=env)
    try:
        return await resolve(client, ref, options)
    finally:
        with trio.CancelScope(shield=True):
            await client.aclose()
