"""fanotify pre-content events on the wire, sans-I/O (pure: no syscalls, no trio).

What ``read(2)`` on a fanotify group returns and what ``write(2)`` answers, as of Linux 6.18
(``include/uapi/linux/fanotify.h``, ``fs/notify/fanotify/fanotify_user.c``):

    events = parse_events(os.read(group_fd, 64 * 1024))   # never a partial event: the kernel
    for ev in events:                                      # copies whole events or fails with EINVAL
        ...                                                # fill [ev.offset, ev.end) via ev.fd
        os.write(group_fd, allow(ev.fd))                   # or deny(ev.fd, errno.EIO)
        os.close(ev.fd)

Facts the daemon must respect, kept here so they are next to the bytes:

* A permission event is answered by the *number* of its event fd (``process_access_response``
  matches ``event->fd == response.fd``): any process holding the group may answer, closing the
  event fd does not answer it, and every permission event needs exactly one answer.
* The event fd is opened FMODE_NONOTIFY (``create_fd`` -> ``dentry_open_nonotify``): I/O through
  it raises no events, so ``pwrite`` through it (``event_f_flags`` O_RDWR) cannot deadlock.
* Ranges are page aligned (``fsnotify_pre_content``: offset rounded down, end rounded up) and may
  reach past EOF; ``count`` is 0 for truncate (``fsnotify_truncate_perm``). On regular files every
  FAN_PRE_ACCESS carries a range in 6.18 (range-less ones come only from readdir, on directories).
* FAN_Q_OVERFLOW comes with ``fd == FAN_NOFD`` and needs no answer; the permission event that
  overflowed was dropped and its access ALLOWED (``fanotify_handle_event``): use FAN_UNLIMITED_QUEUE.
* ``deny(fd, errno)`` accepts only the errnos ``process_access_response`` allows (DENY_ERRNOS);
  the erofs reader above a denied backing-file read gets EIO whatever the errno.
"""

from __future__ import annotations

import errno as _errno
import os
import struct
from dataclasses import dataclass
from typing import Final

from ...errors import ErofsMountError

# include/uapi/linux/fanotify.h: events (the ones a pre-content daemon meets)
FAN_Q_OVERFLOW: Final = 0x00004000
FAN_OPEN_PERM: Final = 0x00010000
FAN_ACCESS_PERM: Final = 0x00020000
FAN_OPEN_EXEC_PERM: Final = 0x00040000
FAN_PRE_ACCESS: Final = 0x00100000  # 0x00080000 is the retired FAN_DIR_MODIFY; early patches used it
FAN_ONDIR: Final = 0x40000000
# include/linux/fanotify.h (not uapi): the events that wait for an answer
FANOTIFY_PERM_EVENTS: Final = FAN_OPEN_PERM | FAN_ACCESS_PERM | FAN_OPEN_EXEC_PERM | FAN_PRE_ACCESS

# fanotify_init() flags
FAN_CLOEXEC: Final = 0x00000001
FAN_NONBLOCK: Final = 0x00000002
FAN_CLASS_NOTIF: Final = 0x00000000  # the class is a 2-bit value, not bit flags
FAN_CLASS_CONTENT: Final = 0x00000004
FAN_CLASS_PRE_CONTENT: Final = 0x00000008
FAN_UNLIMITED_QUEUE: Final = 0x00000010
FAN_UNLIMITED_MARKS: Final = 0x00000020
FAN_ENABLE_AUDIT: Final = 0x00000040
FAN_REPORT_PIDFD: Final = 0x00000080
FAN_REPORT_TID: Final = 0x00000100
FAN_REPORT_FID: Final = 0x00000200
FAN_REPORT_DIR_FID: Final = 0x00000400
FAN_REPORT_NAME: Final = 0x00000800
FAN_REPORT_TARGET_FID: Final = 0x00001000
FAN_REPORT_FD_ERROR: Final = 0x00002000
FAN_REPORT_MNT: Final = 0x00004000

# fanotify_mark() flags; the mark type is a 2-bit value (FAN_MARK_MNTNS = MOUNT | FILESYSTEM)
FAN_MARK_ADD: Final = 0x00000001
FAN_MARK_REMOVE: Final = 0x00000002
FAN_MARK_DONT_FOLLOW: Final = 0x00000004
FAN_MARK_ONLYDIR: Final = 0x00000008
FAN_MARK_IGNORED_MASK: Final = 0x00000020
FAN_MARK_IGNORED_SURV_MODIFY: Final = 0x00000040
FAN_MARK_FLUSH: Final = 0x00000080
FAN_MARK_EVICTABLE: Final = 0x00000200
FAN_MARK_IGNORE: Final = 0x00000400
FAN_MARK_INODE: Final = 0x00000000
FAN_MARK_MOUNT: Final = 0x00000010
FAN_MARK_FILESYSTEM: Final = 0x00000100
FAN_MARK_MNTNS: Final = 0x00000110

FANOTIFY_METADATA_VERSION: Final = 3

FAN_EVENT_INFO_TYPE_FID: Final = 1
FAN_EVENT_INFO_TYPE_DFID_NAME: Final = 2
FAN_EVENT_INFO_TYPE_DFID: Final = 3
FAN_EVENT_INFO_TYPE_PIDFD: Final = 4
FAN_EVENT_INFO_TYPE_ERROR: Final = 5
FAN_EVENT_INFO_TYPE_RANGE: Final = 6
FAN_EVENT_INFO_TYPE_MNT: Final = 7
FAN_EVENT_INFO_TYPE_OLD_DFID_NAME: Final = 10
FAN_EVENT_INFO_TYPE_NEW_DFID_NAME: Final = 12

# responses
FAN_ALLOW: Final = 0x01
FAN_DENY: Final = 0x02
FAN_ERRNO_BITS: Final = 8
FAN_ERRNO_SHIFT: Final = 32 - FAN_ERRNO_BITS
FAN_ERRNO_MASK: Final = (1 << FAN_ERRNO_BITS) - 1
FAN_AUDIT: Final = 0x10  # EINVAL unless the group has FAN_ENABLE_AUDIT
FAN_INFO: Final = 0x20

FAN_NOFD: Final = -1
FAN_NOPIDFD: Final = FAN_NOFD
FAN_EPIDFD: Final = -2

# Host byte order, standard sizes: the kernel writes native structs (x86-64, arm64: little endian).
FAN_EVENT_METADATA = struct.Struct("=IBBHQii")  # event_len vers reserved metadata_len mask fd pid
FAN_EVENT_INFO_HEADER = struct.Struct("=BBH")  # info_type pad len
FAN_EVENT_INFO_PIDFD = struct.Struct("=BBHi")  # hdr, pidfd
FAN_EVENT_INFO_RANGE = struct.Struct("=BBHIQQ")  # hdr, pad, offset, count
FANOTIFY_RESPONSE = struct.Struct("=iI")  # fd response
FAN_EVENT_METADATA_LEN: Final = FAN_EVENT_METADATA.size
assert (FAN_EVENT_METADATA.size, FAN_EVENT_INFO_HEADER.size, FAN_EVENT_INFO_PIDFD.size,
        FAN_EVENT_INFO_RANGE.size, FANOTIFY_RESPONSE.size) == (24, 4, 8, 24, 8)

# fanotify_user.c process_access_response: "Limit errno to values expected on open(2)/read(2)/
# write(2) of regular files"; anything else is EINVAL and the event stays pending.
DENY_ERRNOS: Final = frozenset({_errno.EIO, _errno.EPERM, _errno.EBUSY, _errno.ETXTBSY,
                                _errno.EAGAIN, _errno.ENOSPC, _errno.EDQUOT})


def FAN_DENY_ERRNO(err: int) -> int:  # noqa: N802 - the uapi macro
    return FAN_DENY | ((err & FAN_ERRNO_MASK) << FAN_ERRNO_SHIFT)


@dataclass(frozen=True, slots=True)
class Event:
    """One event. ``fd`` is the event fd to answer with and close (FAN_NOFD: none); ``pidfd`` is
    set only for groups with FAN_REPORT_PIDFD and must be closed too when >= 0."""

    fd: int
    mask: int
    pid: int
    offset: int | None = None
    count: int | None = None
    pidfd: int | None = None

    @property
    def is_overflow(self) -> bool:
        return bool(self.mask & FAN_Q_OVERFLOW)

    @property
    def needs_response(self) -> bool:
        return self.fd >= 0 and bool(self.mask & FANOTIFY_PERM_EVENTS)

    @property
    def has_range(self) -> bool:
        return self.offset is not None

    @property
    def end(self) -> int | None:
        return None if self.offset is None else self.offset + self.count


def protocol_error(message: str, events: list[Event] | None = None) -> ErofsMountError:
    """Garbled or truncated event buffer. ``.events`` holds the events parsed before the damage:
    their fds are open and their accessors wait, so the caller must still answer and close them."""
    exc = ErofsMountError(f"fanotify: {message}", errno=_errno.EPROTO)
    exc.events = list(events or ())  # type: ignore[attr-defined]
    return exc


def parse_events(buf: bytes | bytearray | memoryview) -> list[Event]:
    """Every event of one ``read(2)`` of a fanotify group (``FAN_EVENT_OK``/``FAN_EVENT_NEXT``, strict).

    Unknown info records are skipped by their header ``len``; a record or event whose length
    cannot advance the cursor, overruns its container or is short for its type is an error.
    """
    mv = memoryview(buf).cast("B")
    out: list[Event] = []
    pos, end = 0, len(mv)
    while pos < end:
        if end - pos < FAN_EVENT_METADATA_LEN:
            raise protocol_error(f"truncated event metadata at {pos} ({end - pos} bytes)", out)
        event_len, vers, _reserved, metadata_len, mask, fd, pid = FAN_EVENT_METADATA.unpack_from(mv, pos)
        if vers != FANOTIFY_METADATA_VERSION:
            raise protocol_error(f"metadata version {vers} at {pos}, expected {FANOTIFY_METADATA_VERSION}", out)
        if event_len < FAN_EVENT_METADATA_LEN:  # would not advance: FAN_EVENT_OK refuses it too
            raise protocol_error(f"event_len {event_len} at {pos} is shorter than the metadata", out)
        if event_len > end - pos:
            raise protocol_error(f"event_len {event_len} at {pos} overruns the buffer ({end - pos} left)", out)
        if not FAN_EVENT_METADATA_LEN <= metadata_len <= event_len:
            raise protocol_error(f"metadata_len {metadata_len} at {pos} (event_len {event_len})", out)
        offset = count = pidfd = None
        rec, stop = pos + metadata_len, pos + event_len
        while rec < stop:
            if stop - rec < FAN_EVENT_INFO_HEADER.size:
                raise protocol_error(f"truncated info header at {rec}", out)
            info_type, _pad, info_len = FAN_EVENT_INFO_HEADER.unpack_from(mv, rec)
            if info_len < FAN_EVENT_INFO_HEADER.size or info_len > stop - rec:
                raise protocol_error(f"info record len {info_len} at {rec} ({stop - rec} left in event)", out)
            if info_type == FAN_EVENT_INFO_TYPE_RANGE:
                if info_len < FAN_EVENT_INFO_RANGE.size or offset is not None:
                    raise protocol_error(f"bad or repeated range record at {rec} (len {info_len})", out)
                offset, count = FAN_EVENT_INFO_RANGE.unpack_from(mv, rec)[4:]
            elif info_type == FAN_EVENT_INFO_TYPE_PIDFD:
                if info_len < FAN_EVENT_INFO_PIDFD.size or pidfd is not None:
                    raise protocol_error(f"bad or repeated pidfd record at {rec} (len {info_len})", out)
                pidfd = FAN_EVENT_INFO_PIDFD.unpack_from(mv, rec)[3]
            rec += info_len
        out.append(Event(fd, mask, pid, offset, count, pidfd))
        pos = stop
    return out


def allow(fd: int) -> bytes:
    """The ``struct fanotify_response`` letting the access of event ``fd`` proceed."""
    if fd < 0:
        raise ValueError(f"no event fd to answer ({fd})")
    return FANOTIFY_RESPONSE.pack(fd, FAN_ALLOW)


def deny(fd: int, errno: int = 0) -> bytes:
    """Refuse event ``fd``: the accessor gets ``errno`` (0: plain FAN_DENY, i.e. EPERM).

    A chosen errno needs a FAN_CLASS_PRE_CONTENT group and one of DENY_ERRNOS."""
    if fd < 0:
        raise ValueError(f"no event fd to answer ({fd})")
    if errno and errno not in DENY_ERRNOS:
        raise ValueError(f"the kernel refuses FAN_DENY_ERRNO({_errno.errorcode.get(errno, errno)}); "
                         f"allowed: {sorted(_errno.errorcode[e] for e in DENY_ERRNOS)}")
    return FANOTIFY_RESPONSE.pack(fd, FAN_DENY_ERRNO(errno) if errno else FAN_DENY)


def init_flags(*, nonblock: bool = True, report_pidfd: bool = False, report_tid: bool = False) -> int:
    """``fanotify_init`` flags of a pre-content group (needs CAP_SYS_ADMIN in the init user ns).

    FAN_UNLIMITED_QUEUE always: on overflow the kernel drops a permission event and ALLOWS it.
    No FAN_REPORT_FID/DIR_FID/NAME/TARGET_FID (EINVAL with any permission class) or
    FAN_REPORT_MNT (notification groups only); PIDFD and TID exclude each other."""
    if report_pidfd and report_tid:
        raise ValueError("FAN_REPORT_PIDFD and FAN_REPORT_TID are mutually exclusive")
    flags = FAN_CLASS_PRE_CONTENT | FAN_CLOEXEC | FAN_UNLIMITED_QUEUE
    if nonblock:
        flags |= FAN_NONBLOCK
    if report_pidfd:
        flags |= FAN_REPORT_PIDFD
    if report_tid:
        flags |= FAN_REPORT_TID
    return flags


def event_f_flags(*, write: bool = True) -> int:
    """Open flags of the event fds: O_RDWR so the daemon can ``pwrite`` through the event fd
    (which raises no events), O_CLOEXEC so they never leak into children (O_CREAT and friends
    are EINVAL: FANOTIFY_INIT_ALL_EVENT_F_BITS)."""
    return (os.O_RDWR if write else os.O_RDONLY) | os.O_LARGEFILE | os.O_CLOEXEC


def mark_flags(*, remove: bool = False) -> tuple[int, int]:
    """``(flags, mask)`` for ``fanotify_mark`` on the backing file: an inode mark for FAN_PRE_ACCESS.

    Place it BEFORE mount(2): a file's event mode is fixed when it is opened
    (``fsnotify_open_perm_and_set_mode``), so the erofs backing file opened before the mark never
    raises events. Only filesystems with SB_I_ALLOW_HSM (ext4, xfs, btrfs) accept it
    (tmpfs: EOPNOTSUPP); FAN_ONDIR with a pre-content mask is EINVAL."""
    cmd = FAN_MARK_REMOVE if remove else FAN_MARK_ADD
    return cmd | FAN_MARK_INODE | FAN_MARK_DONT_FOLLOW, FAN_PRE_ACCESS
