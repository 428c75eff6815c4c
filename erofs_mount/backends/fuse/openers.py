"""What a FUSE daemon serves, opened: ``local_opener`` / ``oci_opener`` return an async opener that
gives ``(image, closers, fds, stats_source, inline)``:

* ``image``: the reader (``erofs.image.Image``, or ``merge.image.MergedImage`` for a whole image);
* ``closers``: what to close when the daemon ends (sync or async callables);
* ``fds``: the descriptors a local image reads (the decoder process keeps only those);
* ``stats_source``: what ``publish.Publisher`` asks for figures;
* ``inline``: whether the image's reads honour ``accel/inline.nowait()`` (local files; a single
  tar layer's resident parts), so reader calls may be tried on the trio thread.
"""

from __future__ import annotations

import logging

from .accel.inline import LocalReader, ResidentReader
from .source import IMAGE_CACHES, open_image, open_local, tune_image

log = logging.getLogger("erofs_mount.fuse")


def local_opener(source: str, devices: tuple[str, ...], verity=None):
    """*verity*: a verity/options.py Choice: every block checked against its root hash."""
    from ...sources.tarlayer import local_kind

    kind = local_kind(source)
    if kind is not None:  # a tar / tar.gz / tar.zst layer file: served through its tar index
        if verity is not None:
            from ...errors import UsageError

            raise UsageError(f"{source}: dm-verity trees are appended to EROFS images, not to tar layers")
        return _layer_opener(source, kind, devices)
    if verity is not None:
        return _verified_local_opener(source, devices, verity)

    async def opener():
        image, opened = open_image(source, devices)  # a few small reads: fine before serving
        # the descriptors the image reads (local sources honour inline.nowait())
        fds = tuple(src.fileno() for src in opened)
        return image, [src.close for src in opened], fds, opened[0], True
    return opener


def _verified_local_opener(source: str, devices: tuple[str, ...], verity):
    """A local image with its dm-verity tree: reads checked in the reader's thread (inline too).
    The image's descriptor goes to the decoder process, which forks with the image, so its reads
    go through the same check (its own copy of the loaded tree; it loads more by itself).  The
    tree covers one device: extra devices cannot be verified, so they are refused."""
    _no_extra_devices(source, devices)

    async def opener():
        from ...erofs.image import Image
        from ...verity.source import open_verified

        local = open_local(source)
        try:
            src = await open_verified(local, verity.root, hash_offset=verity.hash_offset, name=source,
                                      pread=LocalReader(local).read_at)
            image = Image(src.pread, size=src.size, **IMAGE_CACHES)
            tune_image(image)
        except BaseException:
            local.close()
            raise
        log.info("%s: every block verified against root hash %s (%s)", source, verity.root.hex(), verity.origin)
        return image, [local.close], (local.fileno(),), src, True
    return opener


def _no_extra_devices(name: str, devices: tuple[str, ...]) -> None:
    """A dm-verity tree covers one device: a verified image with extra devices is refused."""
    if devices:
        from ...errors import UsageError

        raise UsageError(f"{name}: a dm-verity tree covers one device; an image with extra devices "
                         f"({', '.join(devices)}) cannot be verified")


def _layer_opener(path: str, kind: str, devices: tuple[str, ...]):
    async def open_layer():
        from ...sources.tarlayer.openlayer import open_local_layer

        return await open_local_layer(path, kind)
    return _async_opener(path, open_layer, devices)


def oci_opener(ref: str, oci_options, devices: tuple[str, ...]):
    if oci_options.layer is None and oci_options.blob is None and not devices:
        return _image_opener(ref, oci_options)

    async def open_oci():
        from ...sources.oci.blob import open_oci_source

        return await open_oci_source(ref, options=oci_options)
    return _async_opener(ref, open_oci, devices)


def s3_opener(loc, s3_options, devices: tuple[str, ...]):
    async def open_s3():
        from ...sources.s3.source import open_s3_source

        return await open_s3_source(loc, options=s3_options)
    return _async_opener(str(loc), open_s3, devices)


def _image_opener(ref: str, oci_options):
    """The whole image: every layer opened (bottom first) and, when there are several, merged."""
    async def open_layers():
        from ...sources.oci.image import open_oci_layers

        sources, _res = await open_oci_layers(ref, options=oci_options)
        return sources
    return _async_opener(ref, open_layers, ())


class _Layers:
    """The status figures of a merged image: its layers' counters added up."""

    def __init__(self, sources: list) -> None:
        self.sources = sources
        first = sources[0]
        self.ref, self.platform, self.manifest_digest = first.ref, first.platform, first.manifest_digest
        self.digest = ",".join(s.digest for s in sources)
        self.size = sum(s.size for s in sources)

    def stats(self) -> dict:
        out: dict = {}
        for s in self.sources:
            for k, v in s.stats().items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    out[k] = out.get(k, 0) + v
        out["layers"] = len(self.sources)
        return out


def _async_opener(name: str, open_source, devices: tuple[str, ...]):
    """An image over async sources (a registry blob, a tar layer; or every layer of an image, when
    ``open_source`` returns a list: merged), read through the bridge."""
    async def opener():
        import trio

        from ...erofs.image import Image
        from ...sources.bridge import SyncReadAt

        opened = await open_source()
        sources = opened if isinstance(opened, list) else [opened]
        closers: list = [s.aclose for s in sources]
        try:
            from ...verity.source import VeritySource

            if any(isinstance(s, VeritySource) for s in sources):
                _no_extra_devices(name, devices)
            extra = []
            for dev in devices:
                d = open_local(dev)
                closers.append(d.close)
                extra.append(LocalReader(d).read_at)
            token = trio.lowlevel.current_trio_token()
            # answered inline: a tar layer's bytes in memory (its index, decoded spans), a registry
            # blob's in its persistent cache and the page cache; for a whole image, every layer's
            # (merge/image.py caches only complete values, as Image does: inline-safe)
            resident = not devices and all(hasattr(s, "read_cached") or hasattr(s, "pread_cached")
                                           for s in sources)
            readers = [ResidentReader(s, SyncReadAt(s, token)).read_at if resident else SyncReadAt(s, token).read_at
                       for s in sources]

            def build():  # the reader is sync: built in a worker thread, whose reads come back to this loop
                images = [Image(r, size=s.size, devices=extra, **IMAGE_CACHES) for r, s in zip(readers, sources)]
                if len(images) == 1:
                    return images[0]
                from ...merge.image import MergedImage

                return MergedImage(images)
            image = await trio.to_thread.run_sync(build)
            tune_image(image)
        except BaseException:
            with trio.CancelScope(shield=True):
                for close in reversed(closers):
                    res = close()
                    if hasattr(res, "__await__"):
                        await res
            raise
        log.info("%s: %d source(s), %s (%d bytes)", name, len(sources), sources[0], sum(s.size for s in sources))
        stats = sources[0] if len(sources) == 1 else _Layers(sources)
        # async sources: reads go to worker threads, except what ``resident`` answers inline
        return image, closers, (), stats, resident
    return opener
