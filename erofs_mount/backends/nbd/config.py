"""NBD backend options (pure: no I/O), for ``options.py`` to fill from ``-o``.

    NbdOptions(index=None, dead_conn_timeout=30 days, io_timeout=5, block_size=None,
               mount_flags=0, mount_data="", mode="auto", ...)

* ``-o nbd.index=N``               → ``index`` (default: the first free device)
* ``-o nbd.dead_conn_timeout=S``   → seconds the kernel waits for a reattach before
  failing reads with EIO (default 30 days, like erofs-utils)
* ``-o nbd.io_timeout=S``          → the block layer's request timeout; with NBD's
  TIMEOUT 0 it only decides how soon requests that were in flight when a daemon died
  are resent after ``--reattach`` (kernel default 30; 0 = leave the kernel's)
* ``-o nbd.read_ahead_kb=N``       → the device's read-ahead (default 4096; 0 = kernel default)
* ``-o nbd.block_size=N``          → 512..4096 (default 4096, or the image's smaller one)
* ``-o nbd.mode=ioctl``            → force the ioctl fallback (also EROFS_MOUNT_NBD_IOCTL=1)
* standard mount flags (``nosuid,nodev,noexec,noatime,…``) → ``mount_flags`` (MS_*);
  ``ro`` is implied, ``rw`` is refused; other filesystem options (``acl``,
  ``cache_strategy=…``) → ``mount_data`` for the erofs driver.
"""

from __future__ import annotations

import errno as _errno
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Final

from ...errors import UsageError
from .recovery import NBD_RUN_DIR

# include/uapi/linux/mount.h
MS_RDONLY: Final = 1
MS_NOSUID: Final = 2
MS_NODEV: Final = 4
MS_NOEXEC: Final = 8
MS_SYNCHRONOUS: Final = 16
MS_DIRSYNC: Final = 128
MS_NOSYMFOLLOW: Final = 256
MS_NOATIME: Final = 1024
MS_NODIRATIME: Final = 2048
MS_SILENT: Final = 32768
MS_RELATIME: Final = 1 << 21
MS_STRICTATIME: Final = 1 << 24
MS_LAZYTIME: Final = 1 << 25

# option → (flags to set, flags to clear), as mount(8) spells them
_FLAG_OPTIONS: Final = {
    "ro": (MS_RDONLY, 0),
    "defaults": (0, 0),
    "nosuid": (MS_NOSUID, 0), "suid": (0, MS_NOSUID),
    "nodev": (MS_NODEV, 0), "dev": (0, MS_NODEV),
    "noexec": (MS_NOEXEC, 0), "exec": (0, MS_NOEXEC),
    "sync": (MS_SYNCHRONOUS, 0), "async": (0, MS_SYNCHRONOUS),
    "dirsync": (MS_DIRSYNC, 0),
    "nosymfollow": (MS_NOSYMFOLLOW, 0),
    "noatime": (MS_NOATIME, 0), "atime": (0, MS_NOATIME),
    "nodiratime": (MS_NODIRATIME, 0), "diratime": (0, MS_NODIRATIME),
    "relatime": (MS_RELATIME, 0), "norelatime": (0, MS_RELATIME),
    "strictatime": (MS_STRICTATIME, 0), "nostrictatime": (0, MS_STRICTATIME),
    "lazytime": (MS_LAZYTIME, 0), "nolazytime": (0, MS_LAZYTIME),
    "silent": (MS_SILENT, 0), "loud": (0, MS_SILENT),
}

DEFAULT_DEAD_CONN_TIMEOUT: Final = 30 * 24 * 3600  # erofs-utils EROFS_NBD_DEAD_CONN_TIMEOUT
DEFAULT_IO_TIMEOUT: Final = 5
DEFAULT_READ_AHEAD_KB: Final = 4096  # larger requests: each costs a few syscalls in the daemon


@dataclass(frozen=True, slots=True)
class NbdOptions:
    index: int | None = None
    dead_conn_timeout: int = DEFAULT_DEAD_CONN_TIMEOUT
    io_timeout: int = DEFAULT_IO_TIMEOUT
    read_ahead_kb: int = DEFAULT_READ_AHEAD_KB  # the device's read-ahead (0: leave the kernel's 128)
    block_size: int | None = None
    mount_flags: int = MS_RDONLY
    mount_data: str = ""
    mode: str = "auto"  # "auto" (netlink, ioctl only when the family is absent), "netlink", "ioctl"
    zero_copy: str = "sendfile"  # "sendfile", "pread" or "off" (see server.py)
    run_dir: str = NBD_RUN_DIR  # where recovery records live (tests only change it)
    log_file: str | None = None  # default: daemon.log_path("nbdN")
    foreground: bool = False  # serve in this process (debugging)
    ready_timeout: float = 60.0  # how long mount waits for the device and the mount


def split_mount_options(options: Iterable[str]) -> tuple[int, str]:
    """Standard flags → MS_* bits (MS_RDONLY always on); the rest → the fs data string."""
    flags = MS_RDONLY
    data = []
    for opt in options:
        opt = opt.strip()
        if not opt:
            continue
        if opt == "rw":
            raise UsageError("EROFS is read-only: the 'rw' mount option is refused", errno=_errno.EROFS)
        if opt in _FLAG_OPTIONS:
            set_, clear = _FLAG_OPTIONS[opt]
            flags = (flags | set_) & ~clear
        else:
            data.append(opt)
    return flags | MS_RDONLY, ",".join(data)


def _int(key: str, value: str, lo: int, hi: int) -> int:
    try:
        n = int(value, 10)
    except ValueError:
        raise UsageError(f"-o {key}={value}: not a number") from None
    if not lo <= n <= hi:
        raise UsageError(f"-o {key}={value}: out of range {lo}..{hi}")
    return n


def apply_nbd_option(opts: NbdOptions, key: str, value: str) -> NbdOptions:
    """One ``-o nbd.KEY=VALUE`` (key without the ``nbd.`` prefix)."""
    if key == "index":
        return replace(opts, index=_int("nbd.index", value, 0, 2**20))
    if key == "dead_conn_timeout":
        return replace(opts, dead_conn_timeout=_int("nbd.dead_conn_timeout", value, 0, 2**40))
    if key == "io_timeout":
        return replace(opts, io_timeout=_int("nbd.io_timeout", value, 0, 3600))
    if key == "read_ahead_kb":
        return replace(opts, read_ahead_kb=_int("nbd.read_ahead_kb", value, 0, 1 << 20))
    if key == "block_size":
        n = _int("nbd.block_size", value, 512, 4096)
        if n & (n - 1):
            raise UsageError(f"-o nbd.block_size={value}: not a power of two")
        return replace(opts, block_size=n)
    if key == "mode":
        if value not in ("auto", "netlink", "ioctl"):
            raise UsageError(f"-o nbd.mode={value}: expected auto, netlink or ioctl")
        return replace(opts, mode=value)
    if key == "zero_copy":
        if value not in ("sendfile", "pread", "off"):
            raise UsageError(f"-o nbd.zero_copy={value}: expected sendfile, pread or off")
        return replace(opts, zero_copy=value)
    raise UsageError(f"unknown NBD option nbd.{key}")


def nbd_options_from(options: Iterable[str], base: NbdOptions | None = None) -> NbdOptions:
    """Convenience for tests and the CLI: ``["nbd.index=3", "nosuid", "acl"]`` → NbdOptions."""
    opts = base or NbdOptions()
    rest = []
    for opt in options:
        if opt.startswith("nbd."):
            key, _, value = opt[4:].partition("=")
            opts = apply_nbd_option(opts, key, value)
        else:
            rest.append(opt)
    flags, data = split_mount_options(rest)
    return replace(opts, mount_flags=flags, mount_data=data)
