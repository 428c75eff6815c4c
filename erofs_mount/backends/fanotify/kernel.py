"""The syscalls of fanotify mode (ctypes; thin, synchronous): fanotify groups and marks, and the
probe ``--mode auto`` asks (mount(2) itself: backends/kmount.py).

    pre_content_group() -> fd        FAN_CLASS_PRE_CONTENT, unlimited queue, nonblocking (wire.py)
    guard_group() -> fd              FAN_CLASS_CONTENT, for FAN_ACCESS_PERM (the fallback deny, guard.py)
    mark(group, path, mask, remove=False)
    unsupported_reason(directory) -> str | None   why fanotify mode cannot work here, or None
    first_hole(fd, start, size) -> int            lseek SEEK_HOLE (raises no events)
    read_events(group) -> list[wire.Event]        one read(2) of a group, parsed
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno as _errno
import logging
import os
import tempfile

from ...errors import ErofsMountError
from .. import kmount
from . import wire

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
_libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p]

log = logging.getLogger("erofs_mount.fanotify")
AT_FDCWD = -100
SEEK_HOLE = 4


def _fail(what: str) -> ErofsMountError:
    err = ctypes.get_errno()
    return ErofsMountError(f"{what}: {os.strerror(err)}", errno=err)


def pre_content_group() -> int:
    fd = _libc.fanotify_init(wire.init_flags(nonblock=True), wire.event_f_flags(write=False))
    if fd < 0:
        raise _fail("fanotify_init(FAN_CLASS_PRE_CONTENT)")
    return fd


def guard_group() -> int:
    flags = wire.FAN_CLASS_CONTENT | wire.FAN_CLOEXEC | wire.FAN_NONBLOCK | wire.FAN_UNLIMITED_QUEUE
    fd = _libc.fanotify_init(flags, wire.event_f_flags(write=False))
    if fd < 0:
        raise _fail("fanotify_init(FAN_CLASS_CONTENT)")
    return fd


def mark(group: int, path: str, mask: int, *, remove: bool = False) -> None:
    flags, _pre_access = wire.mark_flags(remove=remove)
    if _libc.fanotify_mark(group, flags, mask, AT_FDCWD, os.fsencode(path)) != 0:
        raise _fail(f"fanotify_mark {path}")


def first_hole(fd: int, start: int, size: int) -> int:
    """The offset of the first hole at or after ``start`` (``size``: none)."""
    if start >= size:
        return size
    try:
        return min(os.lseek(fd, start, SEEK_HOLE), size)
    except OSError as exc:
        if exc.errno == _errno.ENXIO:
            return size
        raise


def unsupported_reason(directory: str) -> str | None:
    """Why fanotify mode cannot work with its sparse files in ``directory`` (None: it can): root,
    pre-content groups (Linux 6.14+, CONFIG_FANOTIFY_ACCESS_PERMISSIONS), a filesystem that accepts
    pre-content marks (SB_I_ALLOW_HSM: ext4, xfs, btrfs; not tmpfs), and erofs mounting a regular
    file (CONFIG_EROFS_FS_BACKED_BY_FILE: an empty file then fails with EINVAL, "no valid
    superblock", where a kernel without it says ENOTBLK).  Probed, never guessed from a version."""
    if os.geteuid() != 0:
        return "fanotify mode needs root (fanotify permission events need CAP_SYS_ADMIN)"
    try:
        group = pre_content_group()
    except ErofsMountError as exc:
        return f"no fanotify pre-content events in this kernel (Linux 6.14+): {exc}"
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".probe") as f:
            try:
                mark(group, f.name, wire.FAN_PRE_ACCESS)
            except ErofsMountError as exc:
                return f"{directory}: its filesystem takes no pre-content marks (ext4, xfs, btrfs do): {exc}"
            mark(group, f.name, wire.FAN_PRE_ACCESS, remove=True)
            with tempfile.TemporaryDirectory(dir=directory, prefix=".probe") as mnt:
                try:
                    kmount.mount(f.name, mnt, "erofs")
                except ErofsMountError as exc:
                    err = exc.errno
                else:
                    kmount.umount(mnt, detach=True)   # an empty file cannot be EROFS
                    return None
                if err in (_errno.EINVAL, _errno.EUCLEAN):
                    return None
                if err == _errno.ENODEV:
                    return "the kernel has no erofs driver (modprobe erofs)"
                return f"the kernel's erofs cannot mount a regular file (Linux 6.12+ with file-backed mounts): " \
                       f"{os.strerror(err)}"
    except OSError as exc:
        return f"{directory}: {exc.strerror}"
    finally:
        os.close(group)


def read_events(group: int) -> list[wire.Event]:
    """What one read(2) of the group gives ([] when nothing is queued).  A garbled buffer still
    yields the events parsed before the damage (their readers wait for an answer); the error is logged."""
    try:
        buf = os.read(group, 64 * 1024)
    except BlockingIOError:
        return []
    try:
        return wire.parse_events(buf)
    except Exception as exc:  # noqa: BLE001 - answer what was parsed, never leave a reader hanging
        log.error("%s", exc)
        return list(getattr(exc, "events", []))

