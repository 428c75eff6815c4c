"""Block sources: byte providers with no EROFS knowledge.

The interface every source implements (``Source`` below, a Protocol)::

    size: int                                    # bytes, fixed for the source's life
    async read_at(offset, length) -> bytes       # exactly `length` bytes; shorter only past
                                                 # the end (b"" at/after size); never a hang:
                                                 # failures raise errors.SourceError (EIO …)
    async aclose() -> None                       # idempotent; releases fds/connections/tasks
    stats() -> dict                              # counters: bytes_fetched, requests,
                                                 # cache_hits, cache_misses, retries, …

Concrete sources:

- ``LocalSource.open(path)`` (``local.py``): regular file or block device
  (size by ``BLKGETSIZE64``).  Also sync ``pread(offset, length)`` and
  ``fileno()`` (for ``os.sendfile`` in the NBD server) and ``close()``.
- ``await open_oci_source(ref, *, options=OciOptions(...), layer=None,
  blob=None, platform=None)`` (``oci/blob.py``): an ``OciBlobSource`` that
  resolved the reference ONCE and pinned the blob digest; it exposes
  ``.digest``, ``.ref`` (the Reference pinned to the manifest digest),
  ``.platform``, ``.media_type``, ``.layer_index`` and ``.manifest_digest``.
  Reads go through aligned chunks in an LRU with request coalescing,
  read-ahead and bounded retries, and optionally a persistent per-digest cache
  (``diskcache.py``; ``-o oci.cache[=DIR]``, bounded by ``cache_limit=``).
  ``OciOptions.from_mount_options(dict)`` (``oci/options.py``) turns ``-o``
  option strings into options; ``oci/resolve.py`` has ``inspect_oci`` and
  ``inspection_lines`` for ``oci-inspect``.

For sync callers running in a trio worker thread (the pure EROFS reader under
FUSE) ``SyncReadAt(source, trio_token)`` (``bridge.py``) offers a sync
``read_at(offset, length)``: a direct ``pread`` for a LocalSource, a
``trio.from_thread.run`` of the async read otherwise.

Heavy modules (trio, httpx) are imported lazily: importing
``erofs_mount.sources.oci.reference`` pulls in neither.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable


@runtime_checkable
class Source(Protocol):
    size: int

    async def read_at(self, offset: int, length: int) -> bytes: ...

    async def aclose(self) -> None: ...

    def stats(self) -> dict: ...


_LAZY = {
    "LocalSource": ("local", "LocalSource"),
    "SyncReadAt": ("bridge", "SyncReadAt"),
    "OciBlobSource": ("oci.blob", "OciBlobSource"),
    "open_oci_source": ("oci.blob", "open_oci_source"),
    "OciOptions": ("oci.options", "OciOptions"),
    "parse_reference": ("oci.reference", "parse_reference"),
}

__all__ = ["Source", *_LAZY]

if TYPE_CHECKING:  # pragma: no cover
    from .bridge import SyncReadAt
    from .local import LocalSource
    from .oci.blob import OciBlobSource, open_oci_source
    from .oci.options import OciOptions
    from .oci.reference import parse_reference


def __getattr__(name: str):
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{module}"), attr)
