"""Opening the block source a recovery record names, through the shared source layer.

``open_source(record)`` → a ``sources.Source`` (``size``, ``read_at``, ``aclose``, ``stats``;
local ones also ``fileno``/``pread`` for the server's zero-copy path).

``record_for_oci(ref, src, options)`` → the ``OCI_NATIVE_BLOB`` record to write for a
registry source: the digest the source pinned (a moved tag can never change what a
reattach serves), and what a new process needs to reach the registry again as
``key=value`` option lines (erofs-utils reads only the first line).  Credentials go
into the record only when the user typed the password on the command line (nothing
else could supply it again); a password file is remembered by its path.
"""

from __future__ import annotations

import errno as _errno
from typing import Any

from ...errors import ErofsMountError
from .recovery import LocalRecord, OciLayerRecord, OciNativeBlobRecord, Record

# OciOptions fields that a reattach needs again, as record option lines (the tuning ones only
# when they differ from the default: e.g. oci.retries=20 must survive a reattach)
_OCI_KEEP = {"insecure": bool, "cafile": str, "password_file": str, "cache": str, "username": str,
             "retries": int, "retry_time": float, "timeout": float, "chunk_size": int, "memory_limit": int,
             "cache_limit": int, "readahead": int, "max_request": int, "connections": int}


def oci_options_from_record(record: OciLayerRecord | OciNativeBlobRecord) -> Any:
    from ...sources.oci.options import OciOptions

    kw: dict[str, Any] = {}
    for key, value in record.options:
        kind = _OCI_KEEP.get(key)
        if kind is bool:
            kw[key] = value == "1"
        elif kind is str:
            kw[key] = value
        elif kind is not None:
            try:
                kw[key] = kind(value)
            except ValueError:
                raise ErofsMountError(f"recovery record: option {key}={value!r} is not a number",
                                      errno=_errno.EINVAL) from None
    if record.username is not None or record.password is not None:
        kw["username"] = record.username or None
        kw["password"] = record.password
    return OciOptions(**kw)


def record_for_oci(ref: str, platform: str, digest: str, options: Any) -> OciNativeBlobRecord:
    from ...sources.oci.options import OciOptions

    default = OciOptions()
    extra: list[tuple[str, str]] = []
    for key, kind in _OCI_KEEP.items():
        value = getattr(options, key, None)
        if kind is bool:
            if value:
                extra.append((key, "1"))
        elif kind is str:
            if value is not None and not (key == "username" and options.password is not None):
                extra.append((key, str(value)))
        elif value is not None and value != getattr(default, key):
            extra.append((key, repr(value) if kind is float else str(value)))
    if options.password is not None:  # typed on the command line: nothing else can supply it again
        return OciNativeBlobRecord(ref, platform, digest, options.username or "", options.password, tuple(extra))
    return OciNativeBlobRecord(ref, platform, digest, options=tuple(extra))


def pinned_record(record: OciLayerRecord, src: Any) -> OciNativeBlobRecord:
    """The ``OCI_NATIVE_BLOB`` record for what an ``OCI_LAYER`` record resolved to (credentials
    and option lines kept as they were)."""
    return OciNativeBlobRecord(str(src.ref), src.platform, src.digest, record.username, record.password,
                               record.options)


async def open_source(record: Record) -> Any:
    """Open the source ``record`` describes (the digest of an OCI_NATIVE_BLOB record is pinned)."""
    if isinstance(record, LocalRecord):
        from ...sources.local import LocalSource

        return LocalSource.open(record.path)
    if isinstance(record, (OciLayerRecord, OciNativeBlobRecord)):
        from ...sources.oci.blob import open_oci_source

        options = oci_options_from_record(record)
        if isinstance(record, OciNativeBlobRecord):
            return await open_oci_source(record.ref, options=options, blob=record.digest, platform=record.platform)
        # erofs-utils' OCI_LAYER re-resolves the tag: we read it, but never write it
        return await open_oci_source(record.ref, options=options, layer=record.layer_index,
                                     platform=record.platform)
    raise ErofsMountError(f"cannot open a source for {record!r}", errno=_errno.EINVAL)
