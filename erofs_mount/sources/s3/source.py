"""``open_s3_source``: an EROFS image kept as an S3 object, read lazily like a registry blob.

The object is pinned at open (``client.S3Client.pin``: ETag, version) and read through the
registry blob's machinery (``oci/blob.py`` OciBlobSource: aligned chunks in an LRU, coalescing,
sequential read-ahead streams, bounded retries, the persistent cache with ``s3.cache``), so every
mode takes it where it takes a registry layer.  The persistent cache entry is named after the pinned
identity (endpoint, bucket, key, ETag, version): a replaced object never reads another's blocks.
A trusted ``verity.roothash=`` checks every block as for a registry layer (verity/source.py).
"""

from __future__ import annotations

import logging
import os

import trio

from ...errors import NotErofsError
from ..diskcache import default_root
from ..oci.blob import OciBlobSource
from ..oci.manifest import EROFS_SUPER_OFFSET, check_erofs_magic
from .client import S3Client
from .options import S3Location, S3Options, aws_endpoint, cache_key, parse_location, pinned_text
from .signing import resolve

log = logging.getLogger("erofs_mount.sources.s3")
MEDIA_TYPE = "application/vnd.erofs"


class S3ObjectSource(OciBlobSource):
    """An OciBlobSource whose blob is one pinned S3 object (``.location``, ``.etag``, ``.version_id``)."""

    def __init__(self, client: S3Client, size: int) -> None:
        super().__init__(client, digest=cache_key(client.endpoint, client.loc, client.etag, client.version_id),
                         size=size, media_type=MEDIA_TYPE, ref=client.loc, platform="", layer_index=0,
                         manifest_digest="", options=client.s3.transfer)

    # what the client pinned and resolved (fixed once it opened)
    location = property(lambda self: self.client.loc)
    etag = property(lambda self: self.client.etag)
    version_id = property(lambda self: self.client.version_id)
    endpoint = property(lambda self: self.client.endpoint)
    region = property(lambda self: self.client.region)
    path_style = property(lambda self: self.client.path_style)

    @property
    def pinned(self) -> str:
        """``etag:E[,version:V]`` (status)."""
        return pinned_text(self.etag, self.version_id)

    def pins(self) -> dict[str, str]:
        """The option lines that reopen exactly this object: ``s3.etag`` (and ``s3.version_id``)."""
        return {"s3.etag": self.etag, **({"s3.version_id": self.version_id} if self.version_id else {})}

    @property
    def credentials_origin(self) -> str | None:
        creds = self.client.creds
        return creds.origin if creds is not None else None

    @property
    def static_credentials(self) -> tuple[str, str] | None:
        """Long-lived keys a recovery record may keep (erofs-utils keeps them), else None."""
        creds = self.client.creds
        return creds.static_pair if creds is not None else None

    def pinned_options(self) -> S3Options:
        """The options that reopen exactly this object (a recovery record's)."""
        import dataclasses

        return dataclasses.replace(self.client.s3, endpoint=self.endpoint, region=self.region,
                                   path_style=self.path_style, etag=self.etag, version_id=self.version_id)

    def stats(self) -> dict:
        st = super().stats()
        st["digest"] = self.pinned
        return st

    def __repr__(self) -> str:
        return f"S3ObjectSource({self.location} etag={self.etag}, size={self.size})"


def endpoint_of(options: S3Options, region: str, env: dict | None = None) -> str:
    """``s3.endpoint``, else ``$AWS_ENDPOINT_URL_S3`` / ``$AWS_ENDPOINT_URL`` (the AWS tools'
    variables), else AWS's regional endpoint."""
    env = os.environ if env is None else env
    return (options.endpoint or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
            or aws_endpoint(region))


async def open_s3_source(source: str | S3Location, *, options: S3Options | None = None,
                         check_magic: bool = True, verify: bool = True,
                         credentials: tuple[str, str] | None = None):
    """Pin the object *source* names and return a source reading it (verified when a root hash is
    given; with ``verify=False`` — NBD mode, the kernel's dm-verity checks — the raw object with the
    choice in ``.verity``).  *credentials*: keys a recovery record kept."""
    options = options or S3Options()
    loc = parse_location(source) if isinstance(source, str) else source
    creds, region = await trio.to_thread.run_sync(resolve, options, loc, credentials)
    endpoint = endpoint_of(options, region)
    client = S3Client(loc, options, endpoint=endpoint, creds=creds, region=region)
    try:
        size = await client.pin()
        src = S3ObjectSource(client, size)
        t = options.transfer
        if t.cache is not None:
            await src.attach_disk_cache(t.cache or default_root(), t.cache_limit)
        what = f"{loc} (ETag {src.etag})"
        choice, warning = t.verity_choice(annotations=None, pinned=False, what=what)
        if warning:
            log.warning("%s", warning)
        if choice is not None and not verify:
            src.verity = choice
        elif choice is not None:
            from ...verity.source import open_verified

            verified = await open_verified(src, choice.root, hash_offset=choice.hash_offset, name=what)
            src.set_gate(verified.accept)
            if src.disk is not None:
                await trio.to_thread.run_sync(src.disk.use_marks, choice.root.hex())
            log.info("%s: every block verified against root hash %s (%s)", what, choice.root.hex(), choice.origin)
            return await _checked(verified, what) if check_magic else verified
        return await _checked(src, what) if check_magic else src
    except BaseException:
        with trio.CancelScope(shield=True):
            await client.aclose()
        raise


async def _checked(src, what: str):
    if src.size < EROFS_SUPER_OFFSET + 4:
        raise NotErofsError(f"{what}: {src.size} bytes, too small to be an EROFS image")
    check_erofs_magic(await src.read_at(0, EROFS_SUPER_OFFSET + 4), what)
    return src

