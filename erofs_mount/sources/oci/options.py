"""OCI source options (PURE): a frozen dataclass built from ``-o`` option strings.

``OciOptions.from_mount_options({"oci.layer": "0", "oci.insecure": None, …})``
takes option name → value string (``None`` or ``""`` for bare flags) and raises
``UsageError`` naming any bad value.  Keys it does not know are ignored unless
they start with ``oci.`` (an unknown ``oci.*`` key is an error: a typo must not
silently mount something else).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields

from ...errors import UsageError
from .manifest import parse_platform
from .reference import parse_digest
from ...verity.options import parse_mode, parse_offset, parse_roothash

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
_TRUE = {"", "1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def parse_size(name: str, text: str | None, *, minimum: int = 0) -> int:
    """``123``, ``64K``, ``256M``, ``2G`` (binary units, optional ``iB``/``B``)."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", text or "")
    if not m:
        raise UsageError(f"invalid {name}={text!r}: expected a size such as 65536, 64K, 256M or 2G")
    value = int(m.group(1)) << {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}[m.group(2).lower()]
    if value < minimum:
        raise UsageError(f"invalid {name}={text!r}: must be at least {minimum}")
    return value


def _parse_int(name: str, text: str | None, lo: int, hi: int) -> int:
    try:
        value = int(text or "", 10)
    except ValueError:
        raise UsageError(f"invalid {name}={text!r}: expected an integer") from None
    if not lo <= value <= hi:
        raise UsageError(f"invalid {name}={text!r}: must be between {lo} and {hi}")
    return value


def _parse_float(name: str, text: str | None, lo: float, hi: float) -> float:
    try:
        value = float(text or "")
    except ValueError:
        raise UsageError(f"invalid {name}={text!r}: expected a number of seconds") from None
    if not lo <= value <= hi:
        raise UsageError(f"invalid {name}={text!r}: must be between {lo} and {hi}")
    return value


def _parse_bool(name: str, text: str | None) -> bool:
    t = (text or "").strip().lower()
    if t in _TRUE:
        return True
    if t in _FALSE:
        return False
    raise UsageError(f"invalid {name}={text!r}: expected a flag (yes/no)")


@dataclass(frozen=True, slots=True)
class OciOptions:
    username: str | None = None
    password: str | None = None  # from argv: accepted, with a warning (visible in ps)
    password_file: str | None = None
    cafile: str | None = None
    insecure: bool = False  # plain HTTP
    platform: str | None = None  # "os/arch[/variant]"; None = this host
    layer: int | None = None
    blob: str | None = None
    chunk_size: int = 256 * KiB  # cache and minimum fetch unit (bench: 4x less over-fetch than 1 MiB for random reads, same round trips)
    memory_limit: int = 256 * MiB  # the in-memory chunk LRU
    cache: str | None = None  # persistent cache root; "" = the default (/var/cache/… or XDG); None = off
    cache_limit: int = 4 * GiB  # bound of everything under the persistent cache root
    readahead: int = 32 * MiB  # largest sequential read-ahead window (capped at half of memory_limit)
    max_request: int = 16 * MiB  # largest Range GET for a read's own chunks (a read-ahead stream asks for the rest)
    connections: int = 8  # read-ahead streams per source (one long paced GET each); a read's own GETs go out at once
    retries: int = 6  # attempts per GET beyond the first
    retry_time: float = 60.0  # give up on a GET after this many seconds overall
    timeout: float = 20.0  # per-request connect/stall timeout; a read-ahead stream left idle this long ends
    tarindex: str | None = None  # an EROFS tar index made elsewhere (mkfs.erofs --tar=i) for a tar layer
    zinfo: str | None = None     # its gzip checkpoints (mkfs.erofs --gzinfo, SOCI zinfo v2)
    verity: str = "auto"         # verity/options.py: auto | require | off
    verity_root: str | None = None   # verity.roothash (hex)
    verity_offset: int | None = None  # verity.hashoffset
    mirrors: bool = True             # oci.mirrors: read registries.conf / hosts.toml (mirrors.py)
    registries_conf: str | None = None  # oci.registries_conf: this file instead of the usual search
    hosts_dir: str | None = None     # oci.hosts_dir: containerd's hosts.toml directory

    def verity_choice(self, *, annotations: dict | None = None, pinned: bool = False, what: str = "layer"):
        """(root hash choice or None, warning or None) for one layer (verity/options.py choose)."""
        from ...verity.options import choose

        return choose(self.verity, self.verity_root, self.verity_offset, annotations=annotations,
                      pinned=pinned, what=what)

    @classmethod
    def from_mount_options(cls, opts: dict[str, str | None]) -> "OciOptions":
        out = cls(**parse_fields(opts))
        out.validate()
        return out

    def validate(self) -> None:
        if self.layer is not None and self.blob is not None:
            raise UsageError("oci.layer and oci.blob cannot be set together")
        if self.password is not None and self.password_file is not None:
            raise UsageError("oci.password and oci.password_file cannot be set together")
        if (self.password is not None or self.password_file is not None) and not self.username:
            raise UsageError("oci.password/oci.password_file need oci.username")
        if self.chunk_size & (self.chunk_size - 1) or not 4 * KiB <= self.chunk_size <= 64 * MiB:
            raise UsageError(f"invalid oci.chunk_size={self.chunk_size}: a power of two from 4K to 64M")
        if self.memory_limit < self.chunk_size:
            raise UsageError(f"oci.memory_limit={self.memory_limit} is smaller than one chunk ({self.chunk_size})")
        if self.platform is not None:
            parse_platform(self.platform)
        if self.zinfo is not None and self.tarindex is None:
            raise UsageError("oci.zinfo needs oci.tarindex (the index the checkpoints belong to)")

    @property
    def password_on_argv(self) -> bool:
        return self.password is not None

    def as_mount_options(self) -> dict[str, str]:
        """Inverse of from_mount_options for the non-default fields (secrets included)."""
        default = OciOptions()
        out: dict[str, str] = {}
        for name, (field_name, _) in _OPTION_TABLE.items():
            value = getattr(self, field_name)
            if value != getattr(default, field_name):
                out[name] = ("1" if value else "0") if isinstance(value, bool) else str(value)
        return out


def parse_fields(opts: dict[str, str | None]) -> dict:
    """Option name -> value string, parsed into OciOptions field name -> value, each on its own
    (no cross-field checks: a reattach merges these into what its record holds)."""
    kw: dict = {}
    for name, value in opts.items():
        spec = _OPTION_TABLE.get(name)
        if spec is None:
            if name.startswith("oci."):
                known = ", ".join(sorted(_OPTION_TABLE))
                raise UsageError(f"unknown option {name!r} (known: {known})")
            continue
        field_name, parse = spec
        kw[field_name] = parse(name, value)
    return kw


def parse_as(option: str, shown: str, value: str | None) -> tuple[str, object]:
    """(OciOptions field, parsed value) of *option*'s value, a bad one named *shown* in the error
    (S3 objects take the transfer options as ``s3.*``: sources/s3/options.py)."""
    field_name, parse = _OPTION_TABLE[option]
    return field_name, parse(shown, value)


def _str(name: str, value: str | None) -> str:
    if value is None or value == "":
        raise UsageError(f"option {name} needs a value ({name}=…)")
    return value


def _cache_dir(name: str, value: str | None) -> str | None:
    """``oci.cache`` (flag) or ``=auto``: the default root; ``=none``/``off``: no cache; else a path."""
    v = (value or "").strip()
    if v.lower() in ("", "1", "yes", "on", "true", "auto"):
        return ""
    if v.lower() in ("0", "no", "off", "false", "none"):
        return None
    if not v.startswith("/"):
        raise UsageError(f"invalid {name}={value!r}: expected an absolute directory, auto or none")
    return v


def _platform(name: str, value: str | None) -> str:
    return str(parse_platform(_str(name, value)))


def _digest(name: str, value: str | None) -> str:
    try:
        return parse_digest(_str(name, value))
    except UsageError as exc:
        raise UsageError(f"invalid {name}: {exc}") from None


_OPTION_TABLE = {
    "oci.username": ("username", _str),
    "oci.password": ("password", lambda n, v: "" if v is None else v),
    "oci.password_file": ("password_file", _str),
    "oci.cafile": ("cafile", _str),
    "oci.insecure": ("insecure", _parse_bool),
    "oci.platform": ("platform", _platform),
    "oci.layer": ("layer", lambda n, v: _parse_int(n, v, 0, 1 << 20)),
    "oci.blob": ("blob", _digest),
    "oci.chunk_size": ("chunk_size", lambda n, v: parse_size(n, v, minimum=4 * KiB)),
    "oci.memory_limit": ("memory_limit", lambda n, v: parse_size(n, v, minimum=4 * KiB)),
    "oci.cache": ("cache", lambda n, v: _cache_dir(n, v)),
    "cache_limit": ("cache_limit", lambda n, v: parse_size(n, v)),
    "oci.readahead": ("readahead", lambda n, v: parse_size(n, v)),
    "oci.max_request": ("max_request", lambda n, v: parse_size(n, v, minimum=4 * KiB)),
    "oci.connections": ("connections", lambda n, v: _parse_int(n, v, 1, 64)),
    "oci.retries": ("retries", lambda n, v: _parse_int(n, v, 0, 100)),
    "oci.retry_time": ("retry_time", lambda n, v: _parse_float(n, v, 0.1, 3600)),
    "oci.timeout": ("timeout", lambda n, v: _parse_float(n, v, 0.1, 600)),
    "oci.tarindex": ("tarindex", _str),
    "oci.zinfo": ("zinfo", _str),
    "oci.mirrors": ("mirrors", _parse_bool),
    "oci.registries_conf": ("registries_conf", _str),
    "oci.hosts_dir": ("hosts_dir", _str),
    "verity": ("verity", parse_mode),
    "verity.roothash": ("verity_root", parse_roothash),
    "verity.hashoffset": ("verity_offset", parse_offset),
}
OPTION_NAMES = tuple(_OPTION_TABLE)
assert {f for f, _ in _OPTION_TABLE.values()} == {f.name for f in fields(OciOptions)}
