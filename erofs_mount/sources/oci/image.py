"""All the layers of an image, for a whole-image (merged) mount: resolved once, then each layer
opened (concurrently, with no further manifest request) as a source pinned to the manifest digest
and its own blob digest, so every layer comes from the same image even if the tag moves meanwhile.

The in-memory chunk cache (``oci.memory_limit``) is shared out among the layers.
"""

from __future__ import annotations

import dataclasses
import logging

import trio

from ...errors import UsageError, leaf_error
from .blob import open_oci_source
from .options import OciOptions
from .reference import Reference, parse_reference
from .resolve import Resolution, inspect_oci, options_with

log = logging.getLogger("erofs_mount.sources.oci")

MAX_LAYERS = 64         # the merged view's inode numbering (merge/) holds this many


async def open_oci_layers(ref: str | Reference, *, options: OciOptions | None = None,
                          env: dict | None = None) -> tuple[list, Resolution]:
    """(one source per layer, bottom first; the resolution) for the image ``ref`` names."""
    options = options or OciOptions()
    if options.layer is not None or options.blob is not None:
        raise UsageError("a whole-image mount takes no oci.layer/oci.blob")
    res = await inspect_oci(ref, options=options, env=env)
    layers = res.manifest.layers
    if not layers:
        raise UsageError(f"{res.ref}: the image has no layers")
    if len(layers) > MAX_LAYERS:
        raise UsageError(f"{res.ref}: {len(layers)} layers; at most {MAX_LAYERS} can be merged")
    if options.verity_root and len(layers) > 1:
        raise UsageError(f"{res.ref}: verity.roothash is one layer's root hash; this image has {len(layers)} layers "
                         f"(pin the image by digest to use its layers' verity annotations, or mount one with oci.layer=)")
    per = max(options.chunk_size, options.memory_limit // len(layers))
    layer_opts = dataclasses.replace(options, memory_limit=per, readahead=min(options.readahead, per // 2))
    pinned = res.ref  # with the digest of what was resolved (the tag kept for display)
    by_digest = (parse_reference(ref) if isinstance(ref, str) else ref).digest is not None  # verity annotations trusted
    opened: list = [None] * len(layers)

    async def open_one(i: int, d) -> None:
        opened[i] = await open_oci_source(pinned, options=options_with(layer_opts, blob=d.digest),
                                          platform=res.platform, env=env, resolution=res, pinned=by_digest)
        log.info("%s: layer %d of %d: %s %s (%d bytes)", res.ref, i, len(layers), d.digest, d.media_type, d.size)

    try:
        # concurrently: each layer's first reads (its superblock, or its cached tar index) overlap
        async with trio.open_nursery() as nursery:
            for i, d in enumerate(layers):
                nursery.start_soon(open_one, i, d)
    except BaseException as exc:
        with trio.CancelScope(shield=True):
            for src in opened:
                if src is not None:
                    await src.aclose()
        leaf = leaf_error(exc)
        if leaf is not exc and isinstance(leaf, Exception):
            raise leaf from None
        raise
    sources = opened
    return sources, res
