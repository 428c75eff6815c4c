"""Files under the NBD run directory: recovery records, daemon pid files and the allocation lock.

    <run_dir>/mountnbd_nbdN        the recovery record (= backend identifier), 0600
    <run_dir>/mountnbd_nbdN.pid    the serving daemon's pid; the daemon holds flock(LOCK_EX)
                                   on it for its lifetime, so "alive" = "the lock is held"
                                   (no pid-reuse guesswork)
    <run_dir>/mountnbd_nbdN.stats  what the serving daemon publishes for ``status`` (JSON,
                                   rewritten atomically every STATS_INTERVAL seconds; no
                                   secrets): pid, source (ref, platform, pinned digest),
                                   the source's counters (bytes fetched, cache hits,
                                   retries, ...) and totals carried over from the daemons
                                   it replaced; left behind by a killed daemon (so a
                                   reattach knows which digest the device was serving)
    <run_dir>/.lock                held while choosing an index and connecting
"""

from __future__ import annotations

import errno as _errno
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager

from ...errors import ErofsMountError, NotFoundError
from ...statefile import read_json, write_json
from .recovery import Record, format_record, parse_record, record_path


def ensure_run_dir(run_dir: str) -> None:
    """Create the directories first (0700): erofs-utils 1.9.3 silently falls back to ioctl mode
    when they are missing (mount/main.c erofsmount_write_recovery_info)."""
    parent = os.path.dirname(run_dir)
    for d in (parent, run_dir):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            pass


def write_record(path: str, record: Record) -> None:
    """Atomically: a 0600 temp file in the same directory, fsync, rename."""
    text = format_record(record)
    ensure_run_dir(os.path.dirname(path))
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)


def read_record(path: str) -> Record:
    try:
        with open(path, encoding="utf-8", errors="strict") as f:
            text = f.read(65536)
    except FileNotFoundError:
        raise NotFoundError(f"recovery record {path} is missing") from None
    except UnicodeDecodeError:
        raise ErofsMountError(f"recovery record {path} is not UTF-8 text", errno=_errno.EINVAL) from None
    except OSError as exc:
        raise ErofsMountError(f"recovery record {path}: {exc.strerror}", errno=exc.errno or _errno.EIO) from None
    try:
        return parse_record(text)
    except ErofsMountError as exc:
        raise ErofsMountError(f"{path}: {exc}", errno=exc.errno) from None


def remove_quietly(*paths: str) -> None:
    for p in paths:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


def pid_path(identifier: str) -> str:
    return identifier + ".pid"


def stats_path(identifier: str) -> str:
    return identifier + ".stats"


class PidLock:
    """The daemon's claim on a device: an flock'ed pid file next to the record."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = -1

    def acquire(self) -> None:
        ensure_run_dir(os.path.dirname(self.path))
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid = read_pid(self.path)
            raise ErofsMountError(
                f"a live erofs-mount daemon (pid {pid}) still serves this device", errno=_errno.EBUSY
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self, *, remove: bool) -> None:
        if self.fd >= 0:
            if remove:
                remove_quietly(self.path)
            os.close(self.fd)
            self.fd = -1


def read_pid(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def daemon_alive(path: str) -> bool:
    """True when some process holds the pid file's lock."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


@contextmanager
def allocation_lock(run_dir: str) -> Iterator[None]:
    ensure_run_dir(run_dir)
    fd = os.open(os.path.join(run_dir, ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


__all__ = [
    "allocation_lock", "daemon_alive", "ensure_run_dir", "pid_path", "PidLock", "read_json", "read_pid",
    "read_record", "record_path", "remove_quietly", "stats_path", "write_json", "write_record",
]
