"""FUSE mode options: ``FuseOptions`` and the libfuse option set they turn into."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

from ...errors import UsageError
from ...options import FUSE_FLAGS, FUSE_NUMERIC, FUSE_VALUED
from .accel import Accel

DEFAULT_POLL_US = 50  # accel/busypoll.py explains the figure (kept here: this module must not import trio)
MAX_POLL_US = 10_000
# The mount's read-ahead (its /sys/class/bdi read_ahead_kb; the kernel starts a FUSE mount at 128)
# for images with compressed data: the kernel then asks for 1 MiB per READ instead of 256 KiB, and
# a sequential read of a 100 MB lz4hc file takes ~25% less time (bench_fuse.py, "big"); on an
# uncompressed image larger requests were slower (0.094 -> 0.129 s), so those keep the default.
COMPRESSED_READ_AHEAD_KB = 1024
MAX_READ_AHEAD_KB = 65536

# mount(2) flags libfuse passes on to the kernel (lib/mount.c, mount_flags[]); ro is always added
PASSED_FLAGS = frozenset({"nosuid", "suid", "nodev", "dev", "noexec", "exec", "noatime", "atime",
                          "nodiratime", "diratime", "relatime", "norelatime", "strictatime",
                          "nostrictatime", "lazytime", "nolazytime", "sync", "async", "dirsync"})
# mount(8) words that ask for nothing a FUSE mount could do (the kernel's silent/loud, fstab's defaults)
IGNORED_FLAGS = frozenset({"silent", "loud", "defaults"})


@dataclass(frozen=True)
class FuseOptions:
    allow_other: bool = False
    allow_root: bool = False
    default_permissions: bool | None = None   # None: on unless root mounts without allow_other/allow_root
    auto_unmount: bool = False
    fsname: str | None = None                 # None: the source path
    subtype: str = "erofs"
    uid: int | None = None                    # report every inode with this owner
    gid: int | None = None
    max_read: int | None = None
    nosuid: bool = False
    nodev: bool = False
    noexec: bool = False
    noatime: bool = False
    flags: tuple[str, ...] = ()               # other mount(2) flags from PASSED_FLAGS
    foreground: bool = False
    debug: bool = False
    threads: int = 8                          # reader worker threads
    poll_us: int = DEFAULT_POLL_US            # busy-poll window for the next request (accel/busypoll.py); 0: off
    read_ahead_kb: int | None = None          # None: COMPRESSED_READ_AHEAD_KB for compressed images (root
                                              # only), else the kernel's; 0: the kernel's
    decoder: int | None = None                # a decoder process for big READs (accel/decoder.py): None: auto, 0, 1
    accel: str | None = None                  # the accelerators switched on (accel/__init__.py): None: all
    log_file: str | None = None               # None: daemon.log_path("fuse")

    @classmethod
    def from_strings(cls, flags: Iterable[str] = (), fuse: Mapping[str, str] = (), **kw) -> "FuseOptions":
        """From options.MountOptions' ``flags`` (mount(2) flags) and ``fuse`` (key -> value, "" for flags)."""
        fuse = dict(fuse)
        args: dict = dict(kw)
        for key, value in fuse.items():
            if key in FUSE_FLAGS:
                args[key] = True
            elif key in FUSE_NUMERIC:
                args[key] = int(value, 0)
            elif key in FUSE_VALUED:
                args[key] = value
        unknown = set(fuse) - FUSE_FLAGS - FUSE_VALUED
        if unknown:
            raise UsageError(f"unknown FUSE option '{sorted(unknown)[0]}'")
        rest = []
        for flag in flags:
            if flag in ("nosuid", "nodev", "noexec", "noatime"):
                args[flag] = True
            elif flag not in IGNORED_FLAGS:
                rest.append(flag)   # libfuse_options refuses one libfuse does not pass on
        args["flags"] = tuple(rest)
        return cls(**args)

    def libfuse_options(self, source: str, *, is_root: bool) -> set[str]:
        """The option set handed to ``pyfuse3.init`` (libfuse mount + session options)."""
        if self.allow_other and self.allow_root:
            raise UsageError("allow_other and allow_root are mutually exclusive")
        if not 0 <= self.poll_us <= MAX_POLL_US:
            raise UsageError(f"poll_us={self.poll_us}: the polling window is 0 (off) to {MAX_POLL_US} microseconds")
        if self.read_ahead_kb is not None:
            if not 0 <= self.read_ahead_kb <= MAX_READ_AHEAD_KB:
                raise UsageError(f"read_ahead_kb={self.read_ahead_kb}: 0 (the kernel's) to {MAX_READ_AHEAD_KB}")
            if self.read_ahead_kb and not is_root:
                raise UsageError("read_ahead_kb needs root (it is the mount's /sys/class/bdi setting)")
        self.accelerators       # an unknown name: one line
        if self.decoder not in (None, 0, 1):
            raise UsageError(f"decoder={self.decoder}: 0 (off) or 1 (a decoder process)")
        opts = {"ro", f"subtype={self.subtype}", f"fsname={_escape(self.fsname or source)}"}
        if self.resolved_default_permissions(is_root=is_root):
            opts.add("default_permissions")
        for key in ("allow_other", "allow_root", "auto_unmount", "nosuid", "nodev", "noexec", "noatime"):
            if getattr(self, key):
                opts.add(key)
        if self.max_read:
            opts.add(f"max_read={self.max_read}")
        for flag in self.flags:
            if flag not in PASSED_FLAGS:
                raise UsageError(f"unknown mount flag '{flag}'")
            opts.add(flag)
        if self.debug:
            opts.add("debug")
        return opts

    @property
    def accelerators(self) -> Accel:
        return Accel.parse(self.accel)

    def resolved_read_ahead_kb(self, *, is_root: bool, compressed: bool) -> int:
        """The read_ahead_kb to set on the new mount; 0: leave the kernel's.  An explicit
        read_ahead_kb is a setting, not an accelerator: it holds with accel=none too."""
        if self.read_ahead_kb is not None:
            return self.read_ahead_kb
        return COMPRESSED_READ_AHEAD_KB if is_root and compressed and self.accelerators.on("readahead") else 0

    def resolved_default_permissions(self, *, is_root: bool) -> bool:
        if self.default_permissions is not None:
            return self.default_permissions
        return not is_root or self.allow_other or self.allow_root


def _escape(value: str) -> str:
    # libfuse splits options at commas; a backslash escapes one (fuse_opt_parse)
    return value.replace("\\", "\\\\").replace(",", "\\,")


