"""S3 objects as sources (PURE): the location, the ``-o s3.*`` options, and object URLs.

Two spellings of the source, both accepted:

- ``s3://BUCKET/KEY`` (``?versionId=V`` pins one version of a versioned bucket);
- erofs-utils' ``BUCKET/KEY`` when an ``s3.*`` option is given (mount/main.c
  ``erofsmount_parse_s3_source``: split at the first ``/``).

Options (erofs-utils 1.9.3 names first, mount/main.c ``erofsmount_parse_s3_option``):
``s3.endpoint=URL`` (no scheme: https), ``s3.passwd_file=PATH`` (``ACCESS:SECRET``),
``s3.region=R``, ``s3.sig=2|4``, ``s3.urlstyle=vhost|path``; then ours: ``s3.path_style``
(= ``urlstyle=path``), ``s3.profile=NAME`` (an AWS profile), ``s3.anonymous`` (sign nothing),
``s3.version_id=V``, ``s3.etag=E`` (pins: a recovery record keeps them), and the transfer settings
the registry source has (``s3.cache``, ``s3.chunk_size``, ``s3.memory_limit``, ``s3.readahead``,
``s3.max_request``, ``s3.connections``, ``s3.retries``, ``s3.retry_time``, ``s3.timeout``,
``s3.cafile``), kept in an OciOptions (``transfer``).

Defaults differ from erofs-utils where erofs-utils' cannot reach AWS today: SigV4 (erofs-utils
defaults to SigV2, which AWS accepts only in old regions), the region from the AWS config or
us-east-1 (erofs-utils has none), and path-style addressing where a virtual host cannot work (an
IP address or ``localhost`` as the endpoint, a bucket name that is no DNS label), as botocore does.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from urllib.parse import parse_qs, quote, urlsplit

from ...errors import UsageError
from ..oci.options import OciOptions, _parse_bool, parse_as

# erofs-utils' enums as its S3_OBJECT records write them (lib/liberofs_s3.h)
URLSTYLE_PATH, URLSTYLE_VHOST = 0, 1
SIG_V2, SIG_V4 = 0, 1

TRANSFER = ("cache", "chunk_size", "memory_limit", "readahead", "max_request", "connections",
            "retries", "retry_time", "timeout", "cafile")
OPTION_NAMES = frozenset({"s3.endpoint", "s3.passwd_file", "s3.region", "s3.sig", "s3.urlstyle", "s3.path_style",
                          "s3.profile", "s3.anonymous", "s3.version_id", "s3.etag",
                          *(f"s3.{t}" for t in TRANSFER)})

_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,254}\Z")
_DNS_BUCKET = re.compile(r"[a-z0-9][a-z0-9-]{1,61}[a-z0-9]\Z|[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]\Z")
_REGION = re.compile(r"[a-z0-9][a-z0-9-]{0,62}\Z")
_TOKEN = re.compile(r"[^\s,]+\Z")   # a record field or an option value: no spaces, no commas


@dataclass(frozen=True, slots=True)
class S3Location:
    bucket: str
    key: str
    version_id: str | None = None

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    @property
    def source(self) -> str:
        """erofs-utils' spelling (its S3_OBJECT record's first field)."""
        return f"{self.bucket}/{self.key}"


def is_s3_source(source: str) -> bool:
    return source.startswith("s3://")


def parse_location(source: str) -> S3Location:
    """``s3://BUCKET/KEY[?versionId=V]`` or ``BUCKET/KEY``."""
    text = source.removeprefix("s3://")
    version = None
    if source.startswith("s3://") and "?" in text:
        text, _, query = text.partition("?")
        q = parse_qs(query, keep_blank_values=True)
        if set(q) - {"versionId"} or len(q.get("versionId", ())) != 1 or not q["versionId"][0]:
            raise UsageError(f"{source}: the only query an s3:// source takes is ?versionId=VERSION")
        version = q["versionId"][0]
    bucket, sep, key = text.partition("/")
    if not sep or not key:
        raise UsageError(f"{source}: an S3 source is s3://BUCKET/KEY (no object key given)")
    if not _BUCKET.match(bucket):
        raise UsageError(f"{source}: {bucket!r} is not an S3 bucket name")
    if len(key.encode()) > 1024 or any(ord(c) < 32 for c in key):
        raise UsageError(f"{source}: the object key is not a valid S3 key")
    return S3Location(bucket, key, version)


def _one_of(name: str, value: str | None, table: dict[str, object]) -> object:
    v = (value or "").strip().lower()
    if v not in table:
        raise UsageError(f"invalid {name}={value!r}: expected {' or '.join(table)}")
    return table[v]


def _token(name: str, value: str | None) -> str:
    if not value or not _TOKEN.match(value):
        raise UsageError(f"option {name} needs a value without spaces ({name}=…)")
    return value


@dataclass(frozen=True, slots=True)
class S3Options:
    endpoint: str | None = None      # as given: URL or host[:port]; None: $AWS_ENDPOINT_URL_S3 / AWS
    region: str | None = None        # None: the AWS config's, else us-east-1
    path_style: bool | None = None   # None: virtual host where it can work
    sig: int = 4                     # 4 (AWS4-HMAC-SHA256) or 2 (erofs-utils' default)
    passwd_file: str | None = None
    profile: str | None = None
    anonymous: bool = False
    version_id: str | None = None
    etag: str | None = None          # without quotes
    transfer: OciOptions = field(default_factory=OciOptions)

    @classmethod
    def from_mount_options(cls, opts: dict[str, str | None]) -> "S3Options":
        """``s3.*`` names (and ``cache_limit``) -> S3Options; an unknown ``s3.*`` is an error,
        anything else is ignored (the caller refuses ``oci.*`` for an S3 source)."""
        kw: dict = {}
        transfer: dict = {}
        for name, value in opts.items():
            if name in ("cache_limit", "verity", "verity.roothash", "verity.hashoffset"):
                f, v = parse_as(name, name, value)
                transfer[f] = v
                continue
            if not name.startswith("s3."):
                continue
            short = name[3:]
            if name not in OPTION_NAMES:
                raise UsageError(f"unknown option {name!r} (known: {', '.join(sorted(OPTION_NAMES))})")
            if short in TRANSFER:
                f, v = parse_as(f"oci.{short}", name, value)
                transfer[f] = v
            elif short == "urlstyle":
                kw["path_style"] = _one_of(name, value, {"vhost": False, "path": True})
            elif short == "path_style":
                kw["path_style"] = _parse_bool(name, value)
            elif short == "sig":
                kw["sig"] = _one_of(name, value, {"4": 4, "2": 2})
            elif short == "anonymous":
                kw["anonymous"] = _parse_bool(name, value)
            elif short == "region":
                v = _token(name, value)
                if not _REGION.match(v):
                    raise UsageError(f"invalid {name}={value!r}: not a region name (such as eu-west-1)")
                kw["region"] = v
            elif short == "etag":
                kw["etag"] = _token(name, value).strip('"')
            else:
                kw[short] = _token(name, value)
        out = cls(**kw, transfer=OciOptions(**transfer))
        try:
            out.transfer.validate()
        except UsageError as exc:   # its messages name the registry's option names
            raise UsageError(str(exc).replace("oci.", "s3.")) from None
        if out.endpoint is not None:
            endpoint_parts(out.endpoint)   # checked now
        if out.anonymous and out.passwd_file:
            raise UsageError("s3.anonymous and s3.passwd_file cannot be set together")
        return out

    def as_mount_options(self) -> dict[str, str]:
        """Inverse of from_mount_options for the non-default fields (no secrets live here)."""
        out: dict[str, str] = {}
        d = S3Options()
        for name in ("endpoint", "region", "passwd_file", "profile", "version_id", "etag"):
            if getattr(self, name) is not None:
                out[f"s3.{name}"] = getattr(self, name)
        if self.path_style is not None:
            out["s3.urlstyle"] = "path" if self.path_style else "vhost"
        if self.sig != d.sig:
            out["s3.sig"] = str(self.sig)
        if self.anonymous:
            out["s3.anonymous"] = "1"
        for k, v in self.transfer.as_mount_options().items():
            out[f"s3.{k[4:]}" if k.startswith("oci.") else k] = v
        return out


def endpoint_parts(endpoint: str) -> tuple[str, str, str]:
    """(scheme, host[:port], path prefix) of an endpoint given as a URL or a bare host."""
    text = endpoint.strip()
    if "://" not in text:
        text = "https://" + text   # erofs-utils lib/remotes/s3.c: no scheme means https
    u = urlsplit(text)
    if u.scheme not in ("http", "https") or not u.hostname or u.query or u.fragment:
        raise UsageError(f"invalid s3.endpoint={endpoint!r}: expected http(s)://HOST[:PORT][/PATH] or HOST")
    try:
        u.port
    except ValueError:
        raise UsageError(f"invalid s3.endpoint={endpoint!r}: bad port") from None
    return u.scheme, u.netloc, u.path.rstrip("/")


def aws_endpoint(region: str) -> str:
    return f"https://s3.{region}.amazonaws.com"


def use_path_style(choice: bool | None, scheme: str, host: str, bucket: str) -> bool:
    """Path style when asked, or when a virtual host cannot work: an IP address or ``localhost``
    as the endpoint, a bucket that is no DNS name, or a dotted one under https (its certificate
    would not match) — botocore's ``is_valid_virtual_host_bucket`` rule."""
    if choice is not None:
        return choice
    name = host.rsplit(":", 1)[0].strip("[]") if not host.startswith("[") else host[1:host.index("]")]
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        pass
    if name == "localhost" or not _DNS_BUCKET.match(bucket) or ".." in bucket:
        return True
    return scheme == "https" and "." in bucket


def object_url(endpoint: str, loc: S3Location, *, path_style: bool | None, version_id: str | None = None) -> str:
    """The object's URL: ``SCHEME://BUCKET.HOST/KEY`` or ``SCHEME://HOST/BUCKET/KEY``, the key
    percent-encoded as SigV4's canonical URI wants it (every byte but ``A-Za-z0-9-._~/``)."""
    scheme, host, prefix = endpoint_parts(endpoint)
    key = quote(loc.key, safe="/~")
    if use_path_style(path_style, scheme, host, loc.bucket):
        url = f"{scheme}://{host}{prefix}/{quote(loc.bucket, safe='')}/{key}"
    else:
        url = f"{scheme}://{loc.bucket}.{host}{prefix}/{key}"
    if version_id:
        url += "?versionId=" + quote(version_id, safe="")
    return url


def pinned_text(etag: str, version_id: str | None) -> str:
    """How status shows what a mount pinned: ``etag:E[,version:V]``."""
    return f"etag:{etag}" + (f",version:{version_id}" if version_id else "")


def refuse_oci_options(oci: dict) -> None:
    if oci:
        raise UsageError(f"oci.* options apply to registry images, not to S3 objects "
                         f"({', '.join('oci.' + k for k in oci)}; the S3 ones are s3.*)")


def cache_key(endpoint: str, loc: S3Location, etag: str, version_id: str | None) -> str:
    """The persistent cache entry of one object's pinned content (diskcache.py: ``s3obj:<hex>``,
    an entry whose name is no content hash: nothing to hash it against)."""
    import hashlib

    ident = "\0".join(("erofs-mount s3 1", endpoint, loc.bucket, loc.key, etag, version_id or ""))
    return "s3obj:" + hashlib.sha256(ident.encode()).hexdigest()

