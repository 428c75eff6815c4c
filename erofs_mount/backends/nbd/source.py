"""Opening the block source a recovery record names, through the shared source layer.

``open_source(record)`` → a ``sources.Source`` (``size``, ``read_at``, ``aclose``, ``stats``;
local ones also ``fileno``/``pread`` for the server's zero-copy path).

``record_for_oci(ref, src, options)`` → the ``OCI_NATIVE_BLOB`` record to write for a
registry source: the blob digest the source pinned (a moved tag can never change what a
reattach serves), and what a new process needs to reach the registry again as
``key=value`` option lines (erofs-utils reads only the first line).  Credentials go
into the record only when the user typed the password on the command line (nothing
else could supply it again); a password file is remembered by its path.

The first line's reference carries no ``@sha256:`` manifest digest: erofs-utils 1.9
(lib/remotes/oci.c ocierofs_parse_ref) knows no digest references and would take
``tag@sha256:…`` for a tag.  It resolves the tag and refuses a blob that is not among
that manifest's layers, so it can fail after a tag moved, never serve another image.
The manifest digest goes on a ``manifest=`` line, which our own reattach uses.

``override_record(record, raw)``: ``--reattach DEV -o oci.*`` — what the user says now
(insecure, CA file, credentials, platform, tuning) wins over what the record holds,
e.g. for erofs-utils' records, which cannot say "plain HTTP".
"""

from __future__ import annotations

import errno as _errno
from typing import Any

from dataclasses import replace

from ...errors import ErofsMountError, UsageError
from .recovery import LocalRecord, OciLayerRecord, OciNativeBlobRecord, Record, S3ObjectRecord

# OciOptions fields that a reattach needs again, as record option lines (the tuning ones only
# when they differ from the default: e.g. oci.retries=20 must survive a reattach)
_OCI_KEEP = {"insecure": bool, "cafile": str, "password_file": str, "cache": str, "username": str,
             "retries": int, "retry_time": float, "timeout": float, "chunk_size": int, "memory_limit": int,
             "cache_limit": int, "readahead": int, "max_request": int, "connections": int,
             "tarindex": str, "zinfo": str,
             # mirrors (sources/oci/mirrored.py): the files are read again by a reattach
             "mirrors": bool, "registries_conf": str, "hosts_dir": str}


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
            if value != getattr(default, key):
                extra.append((key, "1" if value else "0"))
        elif kind is str:
            if value is not None and not (key == "username" and options.password is not None):
                extra.append((key, str(value)))
        elif value is not None and value != getattr(default, key):
            extra.append((key, repr(value) if kind is float else str(value)))
    name, pins = _split_manifest(ref)
    if options.password is not None:  # typed on the command line: nothing else can supply it again
        return OciNativeBlobRecord(name, platform, digest, options.username or "", options.password,
                                   tuple(extra) + pins)
    return OciNativeBlobRecord(name, platform, digest, options=tuple(extra) + pins)


# -- S3 objects: erofs-utils' first line, our s3.* option lines (s3.etag, s3.version_id pin the object)
def s3_options_from_record(record: S3ObjectRecord) -> tuple[Any, Any]:
    """(S3Options, S3Location) that reopen what *record* names.  A record of erofs-utils (no
    ``s3.etag`` line) opens whatever the object is now; the worker then pins it."""
    from ...sources.s3.options import S3Options, parse_location

    raw: dict[str, str | None] = {k: (v if v != "" else None) for k, v in record.options
                                  if k.startswith("s3.") or k == "cache_limit"}
    raw.update({"s3.endpoint": record.endpoint, "s3.urlstyle": "path" if record.url_style == 0 else "vhost",
                "s3.sig": "4" if record.sig == 1 else "2"})
    if record.region:
        raw["s3.region"] = record.region
    try:
        return S3Options.from_mount_options(raw), parse_location(record.source)
    except ErofsMountError as exc:
        raise ErofsMountError(f"recovery record: {exc}", errno=_errno.EINVAL) from None


def record_for_s3(src: Any) -> S3ObjectRecord:
    """The record of an opened S3 object: erofs-utils' line (the resolved endpoint, url style,
    signature and region; long-lived keys as erofs-utils keeps them) + the pins as option lines."""
    opts = src.pinned_options()
    lines = {k: v for k, v in opts.as_mount_options().items()
             if k not in ("s3.endpoint", "s3.region", "s3.urlstyle", "s3.sig")}
    pair = src.static_credentials
    return S3ObjectRecord(src.location.source, src.endpoint, 0 if src.path_style else 1, 1 if opts.sig == 4 else 0,
                          src.region, pair[0] if pair else None, pair[1] if pair else None,
                          tuple(lines.items()))


def pinned_s3_record(record: S3ObjectRecord, src: Any) -> S3ObjectRecord:
    """An S3_OBJECT record of erofs-utils (no ETag) with the object it opened pinned: its ETag and
    version lines added, the rest as it was."""
    return replace(record, options=record.options + tuple(src.pins().items()))


def _split_manifest(ref: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """``reg/repo:tag@sha256:…`` → (``reg/repo:tag``, (("manifest", "sha256:…"),))."""
    name, at, manifest = ref.partition("@")
    return name, ((("manifest", manifest),) if at else ())


def _with_options(options: tuple[tuple[str, str], ...], new: dict[str, str | None]) -> tuple[tuple[str, str], ...]:
    """``options`` with the lines of ``new`` replaced (a None value drops the line)."""
    return tuple((k, v) for k, v in options if k not in new) + tuple((k, v) for k, v in new.items() if v is not None)


def pinned_record(record: OciLayerRecord, src: Any) -> OciNativeBlobRecord:
    """The ``OCI_NATIVE_BLOB`` record for what an ``OCI_LAYER`` record resolved to (credentials
    and option lines kept as they were)."""
    name, pins = _split_manifest(str(src.ref))
    return OciNativeBlobRecord(name, src.platform, src.digest, record.username, record.password,
                               _with_options(record.options, dict(pins)))


def override_record(record: Record, raw: dict[str, str]) -> Record:
    """``--reattach DEV -o oci.KEY[=VALUE],…`` (``raw``: keys without ``oci.``, as
    options.MountOptions.oci holds them): the record with what the user said now."""
    if not raw:
        return record
    names = {k: (k if k == "cache_limit" else f"oci.{k}") for k in raw}
    given = ", ".join(names.values())
    if isinstance(record, LocalRecord):
        raise UsageError(f"{given}: the device serves the local file {record.path}, not a registry blob")
    if isinstance(record, S3ObjectRecord):
        raise UsageError(f"{given}: the device serves the S3 object s3://{record.source}, not a registry blob")
    if "layer" in raw or "blob" in raw:
        raise UsageError("oci.layer/oci.blob cannot be given to --reattach: the device keeps serving the blob "
                         "its record names")
    from ...sources.oci.options import parse_fields

    fields = parse_fields({names[k]: (v if v != "" else None) for k, v in raw.items()})
    out = record
    if "platform" in fields:
        out = replace(out, platform=fields.pop("platform"))
    if "password" in fields or "password_file" in fields:
        user = fields.pop("username", None) or out.username or dict(out.options).get("username")
        if not user:
            raise UsageError("oci.password/oci.password_file need oci.username (the record names no user)")
        if "password" in fields:  # typed now: kept in the record, as at mount time
            out = replace(out, username=user, password=fields.pop("password"))
            out = replace(out, options=tuple(o for o in out.options if o[0] not in ("password_file", "username")))
        else:
            out = replace(out, username=None, password=None)
            fields["username"] = user
    elif "username" in fields and out.password is not None:
        out = replace(out, username=fields.pop("username"))
    lines: dict[str, str | None] = {}
    for key, value in fields.items():
        kind = _OCI_KEEP.get(key)
        if value is None:       # oci.cache=none
            lines[key] = None
        elif kind is bool:
            lines[key] = "1" if value else None
        else:
            lines[key] = repr(value) if kind is float else str(value)
    return replace(out, options=_with_options(out.options, lines))


async def open_source(record: Record) -> Any:
    """Open the source ``record`` describes (the digest of an OCI_NATIVE_BLOB record is pinned)."""
    if isinstance(record, LocalRecord):
        from ...sources.local import LocalSource
        from ...sources.tarlayer import local_kind

        kind = local_kind(record.path)
        if kind is not None:  # a tar layer file: index + tar, the index from the cache after the first time
            from ...sources.tarlayer.openlayer import open_local_layer

            return await open_local_layer(record.path, kind)
        return LocalSource.open(record.path)
    if isinstance(record, S3ObjectRecord):
        from ...sources.s3.source import open_s3_source

        options, loc = s3_options_from_record(record)
        pair = (record.access_key or "", record.secret_key or "") if record.access_key or record.secret_key else None
        return await open_s3_source(loc, options=options, credentials=pair, verify=False)
    if isinstance(record, (OciLayerRecord, OciNativeBlobRecord)):
        from ...sources.oci.blob import open_oci_source

        options = oci_options_from_record(record)
        if isinstance(record, OciNativeBlobRecord):
            manifest = dict(record.options).get("manifest")
            ref = record.ref if manifest is None or "@" in record.ref else f"{record.ref}@{manifest}"
            return await open_oci_source(ref, options=options, blob=record.digest, platform=record.platform,
                                         verify=False)
        # erofs-utils' OCI_LAYER re-resolves the tag: we read it, but never write it
        return await open_oci_source(record.ref, options=options, layer=record.layer_index,
                                     platform=record.platform, verify=False)
    raise ErofsMountError(f"cannot open a source for {record!r}", errno=_errno.EINVAL)


# -- dm-verity (verity/dm.py): the root hash a record keeps (not a secret), on option lines
VERITY_ROOT, VERITY_OFFSET = "verity.roothash", "verity.hashoffset"


def verity_lines(choice: Any) -> tuple[tuple[str, str], ...]:
    if choice is None:
        return ()
    lines = [(VERITY_ROOT, choice.root.hex())]
    if choice.hash_offset is not None:
        lines.append((VERITY_OFFSET, str(choice.hash_offset)))
    return tuple(lines)


def verity_from_record(record: Record) -> Any:
    """The verity/options.py Choice a record keeps, or None."""
    opts = dict(record.options)
    root = opts.get(VERITY_ROOT)
    if not root:
        return None
    from ...verity.options import Choice
    from ...verity.tree import parse_root

    try:
        off = opts.get(VERITY_OFFSET)
        return Choice(parse_root(root), int(off) if off else None, "recovery record")
    except (UsageError, ValueError):
        raise ErofsMountError(f"recovery record: bad {VERITY_ROOT}/{VERITY_OFFSET} line", errno=_errno.EINVAL) from None


def with_verity(record: Record, root: bytes, hash_offset: int) -> Record:
    return replace(record, options=_with_options(record.options, {VERITY_ROOT: root.hex(),
                                                                  VERITY_OFFSET: str(hash_offset)}))
