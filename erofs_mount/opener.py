"""Open a SOURCE for synchronous callers (the CLI tools): a local file, or an OCI layer.

An OCI source is async (httpx on trio): it lives in a trio loop on a background
thread, and the sync reader reaches it through ``trio.from_thread.run``.  A
local source is read with plain ``pread`` in the calling thread.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from typing import Any

from .errors import UsageError
from .options import MountOptions


def is_oci(opts: MountOptions) -> bool:
    return opts.is_oci


def classify(source: str, opts: MountOptions) -> tuple[str, str]:
    """(``"layer"`` | ``"image"`` | ``"s3"`` | ``"local"``, why) for SOURCE on the command line.

    ``s3://BUCKET/KEY``, or erofs-utils' ``BUCKET/KEY`` with an ``s3.*`` option, is an S3 object.
    ``oci.layer``/``oci.blob`` name one layer of a registry image.  Otherwise an existing local path
    wins; anything else that parses as an image reference is one (the whole image), with no
    ``oci.*`` option needed; the rest is a local path that the opener reports missing."""
    import os

    from .sources.s3.options import is_s3_source

    if is_s3_source(source) or opts.s3:
        from .sources.s3.options import refuse_oci_options

        refuse_oci_options(opts.oci)
        return "s3", f"{source} is an S3 object"
    if opts.is_oci:
        return "layer", "oci.layer/oci.blob name a layer"
    if os.path.exists(source):
        if opts.oci:
            raise UsageError(f"{source} is a local file: oci.* options apply to registry images")
        return "local", f"{source} is a local path"
    from .sources.oci.reference import parse_reference

    try:
        ref = parse_reference(source)
    except UsageError:
        return "local", f"{source} is neither a local path nor an image reference"
    return "image", f"{source} is not a local path: the image reference {ref}"


def raw_oci(opts: MountOptions) -> dict[str, str | None]:
    """The ``oci.*`` options (and ``cache_limit``) as OciOptions.from_mount_options takes them."""
    raw: dict[str, str | None] = {f"oci.{k}": (v if v != "" else None) for k, v in opts.oci.items()}
    if "limit" in opts.cache:
        raw["cache_limit"] = opts.cache["limit"]
    raw.update(opts.verity)
    return raw


def raw_s3(opts: MountOptions) -> dict[str, str | None]:
    """The ``s3.*`` options (and ``verity.*``, ``cache_limit``) as S3Options.from_mount_options takes them."""
    raw: dict[str, str | None] = {**opts.s3, **opts.verity}
    if "limit" in opts.cache:
        raw["cache_limit"] = opts.cache["limit"]
    return raw


def s3_options(opts: MountOptions):
    """MountOptions -> sources.s3.options.S3Options."""
    from .sources.s3.options import S3Options

    return S3Options.from_mount_options(raw_s3(opts))


def oci_options(opts: MountOptions):
    """MountOptions (``oci.*``, ``cache_limit``) -> sources.oci.options.OciOptions."""
    from .sources.oci.options import OciOptions

    return OciOptions.from_mount_options(raw_oci(opts))


class TrioThread:
    """A trio loop on a daemon thread, for sync code that needs async sources."""

    def __init__(self) -> None:
        self._ready = threading.Event()
        self._token = None
        self._stop = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="erofs-mount-trio", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        import trio

        async def main() -> None:
            self._token = trio.lowlevel.current_trio_token()
            self._stop = trio.Event()
            self._ready.set()
            await self._stop.wait()

        try:
            trio.run(main)
        except BaseException as exc:  # noqa: BLE001 - surfaced to the creator
            self._error = exc
            self._ready.set()

    def call(self, afn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        import trio

        return trio.from_thread.run(afn, *args, trio_token=self._token)

    def close(self) -> None:
        import trio

        if self._stop is not None and self._thread.is_alive():
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
            self._thread.join(timeout=10)


class SyncSource:
    """``pread(offset, length)``, ``size`` and ``close()`` over any source."""

    def __init__(self, source: Any, loop: TrioThread | None = None) -> None:
        self.source = source
        self.size = source.size
        self._loop = loop
        if loop is None and hasattr(source, "fileno"):
            self.fileno = source.fileno  # zero-copy for callers that can use it (extract)

    def pread(self, offset: int, length: int) -> bytes:
        if self._loop is None:
            return self.source.pread(offset, length)
        return self._loop.call(self.source.read_at, offset, length)

    def close(self) -> None:
        if self._loop is None:
            self.source.close()
            return
        try:
            self._loop.call(self.source.aclose)
        finally:
            self._loop.close()


def _on_loop(open_source: Callable[[], Awaitable[Any]]) -> SyncSource:
    """An async source opened on a trio thread of its own."""
    loop = TrioThread()
    try:
        src = loop.call(open_source)
    except BaseException:
        loop.close()
        raise
    return SyncSource(src, loop)


def open_sync(source: str, opts: MountOptions) -> SyncSource:
    """The primary source named on the command line."""
    kind, _why = classify(source, opts)
    if kind == "s3":
        from .sources.s3.source import open_s3_source

        s3 = s3_options(opts)
        return _on_loop(lambda: open_s3_source(source, options=s3))
    if kind != "local":
        from .sources.oci.blob import open_oci_source

        options = oci_options(opts)
        return _on_loop(lambda: open_oci_source(source, options=options))
    from .sources.local import LocalSource
    from .sources.tarlayer import local_kind

    kind = local_kind(source)
    if kind is not None:  # a tar layer file: served through its tar index (built once, cached)
        from .sources.tarlayer.openlayer import open_local_layer

        return _on_loop(lambda: open_local_layer(source, kind))
    return SyncSource(LocalSource.open(source))


def open_layers_sync(source: str, opts: MountOptions) -> list[SyncSource]:
    """Every layer of the image SOURCE names, bottom first, on one trio thread."""
    from .sources.oci.image import open_oci_layers

    loop = TrioThread()
    try:
        sources, _res = loop.call(lambda: open_oci_layers(source, options=oci_options(opts)))
    except BaseException:
        loop.close()
        raise
    # the loop ends with the process (the tools run once); each source closes on its own loop
    return [SyncSource(s, loop) for s in sources]


def open_devices(opts: MountOptions) -> list[SyncSource]:
    from .sources.local import LocalSource

    return [SyncSource(LocalSource.open(d)) for d in opts.devices]


def inspect_oci_lines(ref: str, opts: MountOptions) -> list[str]:
    """``erofs-mount oci-inspect``: resolve once and describe the image."""
    import trio

    from .sources.oci.resolve import inspect_oci, inspection_lines

    options = oci_options(opts)
    res = trio.run(lambda: inspect_oci(ref, options=options))
    return inspection_lines(res)
