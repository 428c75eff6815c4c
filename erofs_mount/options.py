"""PURE: ``-o`` option strings and ``-t`` types (mount.erofs style) -> a frozen configuration.

``-o`` takes comma-separated options, repeatable; an unknown option is an error
naming it.  ``ro`` is implied and ``rw`` refused: EROFS is read-only.  The
groups follow the consumers: mount(2) flags, FUSE options, NBD options, OCI
options (``oci.*``), extra devices, and kernel erofs options passed through to
the NBD-mode mount.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import UsageError

MODES = ("auto", "nbd", "fanotify", "fuse")

FSTYPES = {"erofs": "auto", "erofs.nbd": "nbd", "erofs.fanotify": "fanotify", "erofs.fuse": "fuse"}

# mount(2) flags that make sense for a read-only filesystem (passed on by both modes)
MOUNT_FLAGS = frozenset({
    "nosuid", "suid", "nodev", "dev", "noexec", "exec", "noatime", "atime", "nodiratime", "diratime",
    "relatime", "norelatime", "strictatime", "nostrictatime", "lazytime", "nolazytime", "silent", "loud",
    "sync", "async", "dirsync", "nosymfollow", "defaults",
})
# kernel erofs mount options (NBD mode hands them to mount -t erofs)
KERNEL_OPTIONS = frozenset({"user_xattr", "nouser_xattr", "acl", "noacl"})
KERNEL_VALUED = frozenset({"cache_strategy", "fsid", "domain_id"})
FUSE_FLAGS = frozenset({"allow_other", "allow_root", "default_permissions", "auto_unmount"})
FUSE_NUMERIC = frozenset({"uid", "gid", "max_read", "poll_us", "read_ahead_kb", "decoder"})
FUSE_VALUED = FUSE_NUMERIC | {"fsname", "subtype", "accel"}
NBD_VALUED = frozenset({"nbd.index", "nbd.dead_conn_timeout", "nbd.io_timeout", "nbd.block_size",
                        "nbd.read_ahead_kb"})
NBD_WORDS = frozenset({"nbd.mode", "nbd.zero_copy"})  # values checked by the NBD backend
# oci.* options are the registry source's (sources/oci/options.py checks their values)
from .sources.oci.options import OPTION_NAMES as _OCI_NAMES  # noqa: E402 - pure module

OCI_OPTIONS = frozenset(n for n in _OCI_NAMES if n.startswith("oci."))
from .sources.s3.options import OPTION_NAMES as S3_OPTIONS  # noqa: E402 - pure module: s3.* (checked there)
CACHE_VALUED = frozenset({"cache_limit", "cache_size"})
VERITY_OPTIONS = frozenset({"verity", "verity.roothash", "verity.hashoffset"})  # verity/options.py checks them


@dataclass(frozen=True)
class MountOptions:
    mode: str = "auto"
    flags: tuple[str, ...] = ()                       # mount(2) flags, in the order given
    kernel: tuple[str, ...] = ()                      # kernel erofs options (NBD mode)
    fuse: dict[str, str] = field(default_factory=dict)  # FUSE options; flags map to ""
    nbd: dict[str, str] = field(default_factory=dict)
    oci: dict[str, str] = field(default_factory=dict)   # keys without the "oci." prefix; flags map to ""
    cache: dict[str, str] = field(default_factory=dict)
    devices: tuple[str, ...] = ()
    verity: dict[str, str] = field(default_factory=dict)  # option name (verity, verity.roothash, …) -> value
    s3: dict[str, str] = field(default_factory=dict)      # s3.* options, full names; flags map to ""

    def verity_choice(self, *, what: str = "image"):
        """The trusted root hash for a local image (verity/options.py choose), or None."""
        from .verity.options import choose, parse_mode, parse_offset

        mode = parse_mode("verity", self.verity.get("verity"))
        off = self.verity.get("verity.hashoffset")
        choice, _warning = choose(mode, self.verity.get("verity.roothash"),
                                  None if off is None else parse_offset("verity.hashoffset", off), what=what)
        return choice

    @property
    def is_oci(self) -> bool:
        return "layer" in self.oci or "blob" in self.oci

    def uint(self, group: str, key: str, default: int | None = None) -> int | None:
        value = getattr(self, group).get(key)
        if value is None:
            return default
        return parse_uint(f"{group}.{key}" if group in ("nbd", "oci") else key, value)


def parse_uint(name: str, value: str) -> int:
    try:
        n = int(value, 0)
    except ValueError:
        raise UsageError(f"option {name}={value}: not a number") from None
    if n < 0:
        raise UsageError(f"option {name}={value}: must not be negative")
    return n


def parse_size(name: str, value: str) -> int:
    """``64M``, ``1G``, ``4096`` -> bytes."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    v = value.strip().lower().removesuffix("ib").removesuffix("b")
    mult = 1
    if v and v[-1] in units:
        mult = units[v[-1]]
        v = v[:-1]
    try:
        n = int(v, 10)
    except ValueError:
        raise UsageError(f"option {name}={value}: not a size (e.g. 512M)") from None
    return n * mult


def mode_from_fstype(fstype: str) -> str:
    try:
        return FSTYPES[fstype]
    except KeyError:
        raise UsageError(f"unknown filesystem type '{fstype}' (use erofs, erofs.nbd, erofs.fanotify or erofs.fuse)") from None


def split_options(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_options(option_strings: list[str] | tuple[str, ...] = (), *, fstype: str | None = None,
                  mode: str | None = None, devices: tuple[str, ...] = ()) -> MountOptions:
    """Parse every ``-o`` string (and ``-t``/``--mode``/``--device``) into one MountOptions."""
    chosen = "auto"
    if fstype:
        chosen = mode_from_fstype(fstype)
    if mode:
        if mode not in MODES:
            raise UsageError(f"unknown mode '{mode}' (use auto, nbd, fanotify or fuse)")
        if fstype and chosen != "auto" and chosen != mode:
            raise UsageError(f"-t {fstype} conflicts with --mode {mode}")
        chosen = mode
    flags: list[str] = []
    kernel: list[str] = []
    fuse: dict[str, str] = {}
    nbd: dict[str, str] = {}
    oci: dict[str, str] = {}
    cache: dict[str, str] = {}
    verity: dict[str, str] = {}
    s3: dict[str, str] = {}
    devs = list(devices)
    for text in option_strings:
        for item in split_options(text):
            key, eq, value = item.partition("=")
            if not eq:
                value = ""
            if eq and not value:
                raise UsageError(f"option {key}= needs a value")
            if key == "ro" and not eq:
                continue
            if key == "rw" and not eq:
                raise UsageError("option rw: EROFS images are read-only (use ro or nothing)")
            if key == "device":
                if not eq:
                    raise UsageError("option device needs a path (device=PATH)")
                devs.append(value)
            elif key in MOUNT_FLAGS and not eq:
                flags.append(key)
            elif key in KERNEL_OPTIONS and not eq:
                kernel.append(key)
            elif key in KERNEL_VALUED and eq:
                kernel.append(item)
            elif key in FUSE_FLAGS and not eq:
                fuse[key] = ""
            elif key in FUSE_VALUED and eq:
                if key in FUSE_NUMERIC:
                    parse_uint(key, value)
                fuse[key] = value
            elif key in NBD_VALUED and eq:
                parse_uint(key, value)
                nbd[key.removeprefix("nbd.")] = value
            elif key in NBD_WORDS and eq:
                nbd[key.removeprefix("nbd.")] = value
            elif key in OCI_OPTIONS:
                oci[key.removeprefix("oci.")] = value
            elif key in S3_OPTIONS:
                s3[key] = value
            elif key in VERITY_OPTIONS:
                from .sources.oci.options import parse_fields

                parse_fields({key: value})  # its value checked now
                verity[key] = value
            elif key in CACHE_VALUED and eq:
                cache["limit"] = str(parse_size(key, value))
            else:
                raise UsageError(f"unknown option '{item}'")
    if "layer" in oci and "blob" in oci:
        raise UsageError("oci.layer and oci.blob are mutually exclusive")
    if s3:
        from .sources.s3.options import S3Options

        S3Options.from_mount_options({**s3, **verity})   # values checked now
        if oci:
            raise UsageError(f"oci.* and s3.* options cannot be mixed ({', '.join('oci.' + k for k in oci)})")
    if "layer" in oci:
        parse_uint("oci.layer", oci["layer"])
    if "blob" in oci and not oci["blob"].startswith("sha256:"):
        raise UsageError(f"oci.blob={oci['blob']}: expected sha256:<64 hex digits>")
    return MountOptions(mode=chosen, flags=tuple(flags), kernel=tuple(kernel), fuse=fuse, nbd=nbd, oci=oci,
                        cache=cache, devices=tuple(devs), verity=verity, s3=s3)
