"""Recovery records, compatible with erofs-utils ``mount.erofs`` (pure: no I/O).

A record tells a new daemon how to reopen the source of an NBD device whose
server died.  Its path is the device's backend identifier
(``/sys/block/nbdN/backend``); ours is ``/var/run/erofsmount/nbd/mountnbd_nbdN``.

First line, as erofs-utils writes and reads it (``mount/main.c``:
``erofsmount_write_recovery_*`` / ``erofsmount_open_recovery_source``)::

    LOCAL <realpath>                               (the rest of the line is the path)
    OCI_LAYER <ref> <platform> <index> [b64(user:pass)]
    OCI_NATIVE_BLOB <ref> <platform> <sha256:64 hex> [b64(user:pass)]
    S3_OBJECT <bucket/key> <endpoint> <urlstyle 0|1> <sig 0|1> <region|(nil)> [b64(access:secret)]

Tokens after the type are separated by runs of spaces; erofs-utils writes a
trailing space when there are no credentials.  erofs-utils reads only the first
line, so what it cannot express (for instance ``insecure=1`` for a plain-HTTP
registry, which erofs-utils 1.9.3 loses) goes on following ``key=value`` lines,
which we read back as ``options``.  ``TARINDEX_OCI_BLOB`` (a layer mounted with
``oci.tarindex=``/``oci.zinfo=``) is read and written in erofs-utils' six-field form, its paths
becoming ``tarindex``/``zinfo`` options.  ``S3_OBJECT`` (an S3 object) is read and written in
erofs-utils' form, with ``s3.etag=``/``s3.version_id=`` lines pinning the object.

We write ``LOCAL`` and, for OCI, ``OCI_NATIVE_BLOB`` with the pinned digest so a
reattach never serves another image after a tag moved (erofs-utils' OCI_LAYER
re-resolves the tag).
"""

from __future__ import annotations

import base64
import binascii
import errno as _errno
import re
from dataclasses import dataclass, field
from typing import Final

from ...errors import ErofsMountError

RUN_DIR: Final = "/var/run/erofsmount"
NBD_RUN_DIR: Final = RUN_DIR + "/nbd"
RECORD_PREFIX: Final = "mountnbd_nbd"

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}\Z")
_OPTION_KEY = re.compile(r"[A-Za-z0-9_.-]+\Z")


def RecordError(message: str, *, errno: int = _errno.EINVAL) -> ErofsMountError:  # noqa: N802
    """A recovery record that cannot be used (unknown type or malformed)."""
    return ErofsMountError(message, errno=errno)


def record_path(index: int, run_dir: str = NBD_RUN_DIR) -> str:
    """The record path (= backend identifier) of /dev/nbd``index``."""
    return f"{run_dir}/{RECORD_PREFIX}{index}"


@dataclass(frozen=True, slots=True)
class LocalRecord:
    path: str
    options: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class OciLayerRecord:
    ref: str
    platform: str
    layer_index: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    options: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class OciNativeBlobRecord:
    ref: str
    platform: str
    digest: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    options: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class S3ObjectRecord:
    """erofs-utils' ``S3_OBJECT`` (mount/main.c ``erofsmount_write_recovery_s3``): the source as
    ``BUCKET/KEY``, the endpoint, its enums ``url_style`` (0 path, 1 virtual host) and ``sig``
    (0 SigV2, 1 SigV4), the region (``(nil)``: none) and, optionally, b64(access:secret).  Our option
    lines pin the object: ``s3.etag=``, ``s3.version_id=`` (and the other ``s3.*`` options)."""
    source: str
    endpoint: str
    url_style: int
    sig: int
    region: str | None = None
    access_key: str | None = None
    secret_key: str | None = field(default=None, repr=False)
    options: tuple[tuple[str, str], ...] = ()


Record = LocalRecord | OciLayerRecord | OciNativeBlobRecord | S3ObjectRecord


def describe(record: Record) -> str:
    """A short human description for logs and status (never the credentials)."""
    if isinstance(record, LocalRecord):
        return record.path
    if isinstance(record, OciLayerRecord):
        return f"{record.ref} ({record.platform}, layer {record.layer_index})"
    if isinstance(record, S3ObjectRecord):
        etag = dict(record.options).get("s3.etag")
        return f"s3://{record.source}" + (f" (ETag {etag})" if etag else "")
    return f"{record.ref}@{record.digest} ({record.platform})"


def encode_credentials(username: str | None, password: str | None) -> str:
    """b64("user:pass"), standard alphabet with padding (erofs-utils lib/base64.c)."""
    return base64.b64encode(f"{username or ''}:{password or ''}".encode()).decode("ascii")


def decode_credentials(token: str) -> tuple[str, str]:
    padded = token + "=" * (-len(token) % 4)  # erofs-utils also accepts it unpadded
    try:
        raw = base64.b64decode(padded, validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise RecordError("recovery record: credentials are not valid base64") from None
    user, sep, password = raw.partition(":")
    if not sep:
        raise RecordError("recovery record: credentials lack the ':' between user and password")
    return user, password


def _check_token(what: str, value: str) -> str:
    if not value or any(c.isspace() for c in value):
        raise RecordError(f"recovery record: {what} {value!r} is empty or contains white space")
    return value


def format_record(record: Record) -> str:
    """The file content for ``record`` (first line in erofs-utils' format)."""
    if isinstance(record, LocalRecord):
        if not record.path.startswith("/") or "\n" in record.path or "\0" in record.path:
            raise RecordError(f"recovery record: local path {record.path!r} must be absolute, on one line")
        first = f"LOCAL {record.path}"
    elif isinstance(record, (OciLayerRecord, OciNativeBlobRecord)):
        parts = [_check_token("image reference", record.ref), _check_token("platform", record.platform)]
        if isinstance(record, OciLayerRecord):
            if record.layer_index < 0:
                raise RecordError("recovery record: negative layer index")
            kind = "OCI_LAYER"
            parts.append(str(record.layer_index))
        else:
            if not _DIGEST.match(record.digest):
                raise RecordError(f"recovery record: digest {record.digest!r} is not sha256:<64 hex>")
            kind = "OCI_NATIVE_BLOB"
            parts.append(record.digest)
        cred = (encode_credentials(record.username, record.password)
                if record.username is not None or record.password is not None else None)
        opts = dict(record.options)
        if kind == "OCI_NATIVE_BLOB" and "tarindex" in opts:
            # erofs-utils' record of a mount with oci.tarindex= (mount/main.c erofsmount_write_recovery_oci):
            # six single-space-separated fields, empty ones kept (erofsmount_reattach_gzran_oci)
            kind = "TARINDEX_OCI_BLOB"
            parts += [cred or "", _check_token("tar index path", opts["tarindex"]),
                      _check_token("zinfo path", opts["zinfo"]) if opts.get("zinfo") else ""]
        elif cred is not None:
            parts.append(cred)
        first = kind + " " + " ".join(parts)
    elif isinstance(record, S3ObjectRecord):
        if record.url_style not in (0, 1) or record.sig not in (0, 1):
            raise RecordError("recovery record: S3 url style and signature version are 0 or 1")
        cred = (encode_credentials(record.access_key, record.secret_key)
                if record.access_key or record.secret_key else "")
        # erofs-utils writes "(nil)" for no region and a trailing space for no credentials
        first = (f"S3_OBJECT {_check_token('S3 source', record.source)} {_check_token('S3 endpoint', record.endpoint)} "
                 f"{record.url_style} {record.sig} {_check_token('S3 region', record.region or '(nil)')} {cred}")
    else:
        raise TypeError(f"not a recovery record: {record!r}")
    lines = [first]
    in_first = ("tarindex", "zinfo") if first.startswith("TARINDEX_OCI_BLOB ") else ()
    for key, value in record.options:
        if key in in_first:
            continue
        if not _OPTION_KEY.match(key) or "\n" in value:
            raise RecordError(f"recovery record: bad option {key!r}")
        lines.append(f"{key}={value}")
    return "\n".join(lines) + "\n"


def _split_tokens(rest: str) -> list[str]:
    # erofs-utils splits on single spaces and skips runs of them; tabs are not separators there.
    return [t for t in rest.split(" ") if t]


def _parse_options(lines: list[str]) -> tuple[tuple[str, str], ...]:
    out = []
    for line in lines:
        if not line.strip():
            continue
        key, sep, value = line.partition("=")
        if not sep or not _OPTION_KEY.match(key):
            raise RecordError(f"recovery record: malformed option line {line!r}")
        out.append((key, value))
    return tuple(out)


def parse_record(text: str) -> Record:
    """Parse a record file's content; raise ``RecordError`` for anything unusable."""
    if not text.strip():
        raise RecordError("recovery record is empty")
    lines = text.split("\n")
    first = lines[0]
    kind, sep, rest = first.partition(" ")
    if not sep:
        raise RecordError(f"recovery record: no source after {kind!r}")
    options = _parse_options(lines[1:])
    if kind == "LOCAL":
        if not rest.startswith("/"):
            raise RecordError(f"recovery record: LOCAL path {rest!r} is not absolute")
        return LocalRecord(rest, options)
    if kind in ("OCI_LAYER", "OCI_NATIVE_BLOB"):
        tokens = _split_tokens(rest)
        if len(tokens) < 3:
            raise RecordError(f"recovery record: {kind} needs <ref> <platform> <{'index' if kind == 'OCI_LAYER' else 'digest'}>")
        if len(tokens) > 4:
            raise RecordError(f"recovery record: {kind} has {len(tokens) - 4} unexpected trailing token(s)")
        ref, platform, third = tokens[:3]
        user = password = None
        if len(tokens) == 4:
            user, password = decode_credentials(tokens[3])
        if kind == "OCI_LAYER":
            if not third.isdigit() or not third.isascii():
                raise RecordError(f"recovery record: layer index {third!r} is not a number")
            return OciLayerRecord(ref, platform, int(third), user, password, options)
        if not _DIGEST.match(third):
            raise RecordError(f"recovery record: digest {third!r} is not sha256:<64 hex>")
        return OciNativeBlobRecord(ref, platform, third, user, password, options)
    if kind == "TARINDEX_OCI_BLOB":
        return _parse_tarindex(rest, options)
    if kind == "S3_OBJECT":
        return _parse_s3(rest, options)
    raise RecordError(f"unknown recovery record type {kind!r}")


def _parse_s3(rest: str, options: tuple[tuple[str, str], ...]) -> S3ObjectRecord:
    """``S3_OBJECT <bucket/key> <endpoint> <urlstyle> <sig> <region|(nil)> [b64cred]``: tokens
    separated by runs of spaces (erofs-utils mount/main.c ``erofsmount_reattach_s3``)."""
    tokens = _split_tokens(rest)
    if len(tokens) < 5:
        raise RecordError("recovery record: S3_OBJECT needs <bucket/key> <endpoint> <urlstyle> <sig> <region>")
    if len(tokens) > 6:
        raise RecordError(f"recovery record: S3_OBJECT has {len(tokens) - 6} unexpected trailing token(s)")
    source, endpoint, style, sig, region = tokens[:5]
    if "/" not in source.strip("/"):
        raise RecordError(f"recovery record: S3 source {source!r} is not BUCKET/KEY")
    if style not in ("0", "1") or sig not in ("0", "1"):
        raise RecordError(f"recovery record: S3 url style {style!r} / signature {sig!r} are not 0 or 1")
    ak = sk = None
    if len(tokens) == 6:
        ak, sk = decode_credentials(tokens[5])
    return S3ObjectRecord(source, endpoint, int(style), int(sig), None if region == "(nil)" else region,
                          ak, sk, options)


def _parse_tarindex(rest: str, options: tuple[tuple[str, str], ...]) -> OciNativeBlobRecord:
    """``TARINDEX_OCI_BLOB <ref> <platform> <digest> <b64cred|""> <tarindex> <zinfo|"">``: split on
    single spaces with empty fields kept, the zinfo path being the rest of the line (erofs-utils
    mount/main.c erofsmount_reattach_gzran_oci).  Read as an OCI_NATIVE_BLOB record whose
    ``tarindex``/``zinfo`` option lines name the prebuilt index."""
    parts = rest.split(" ", 5)
    if len(parts) < 5:
        raise RecordError("recovery record: TARINDEX_OCI_BLOB needs <ref> <platform> <digest> <cred> <tarindex> [zinfo]")
    ref, platform, digest, cred, tarindex = parts[:5]
    zinfo = parts[5] if len(parts) > 5 else ""
    if not ref or not platform:
        raise RecordError("recovery record: TARINDEX_OCI_BLOB has an empty reference or platform")
    if not _DIGEST.match(digest):
        raise RecordError(f"recovery record: digest {digest!r} is not sha256:<64 hex>")
    if not tarindex.startswith("/"):
        raise RecordError(f"recovery record: tar index path {tarindex!r} is not absolute")
    user = password = None
    if cred:
        user, password = decode_credentials(cred)
    extra = [("tarindex", tarindex)] + ([("zinfo", zinfo)] if zinfo else [])
    kept = tuple(o for o in options if o[0] not in ("tarindex", "zinfo"))
    return OciNativeBlobRecord(ref, platform, digest, user, password, kept + tuple(extra))
