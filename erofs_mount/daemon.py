"""Detaching a long-running worker (NBD server, FUSE loop) from the command that starts it.

    def worker(ready: Readiness) -> int:
        ...set everything up...
        ready.ok()            # the command exits 0 now
        ...serve...
        return 0

    run_detached(worker, log_file=log_path("nbd0"))   # returns 0 once ready, or raises

``run_detached`` double-forks: the worker runs in a grandchild in a new session
(the first child calls ``setsid()`` and exits, so the worker is no session leader,
has no controlling terminal and is not a child of the caller), with stdin
on /dev/null and stdout/stderr appended to ``log_file`` (so ``erofs-mount …
| cat`` returns as soon as the mount is live: nothing keeps the caller's
pipe open).  A close-on-exec pipe carries one line back: ``ok`` or the
worker's one-line error.  The caller returns 0 only after ``ok``; it raises
``ErofsMountError`` with the worker's message (and errno) after ``fail`` or
when the worker died before saying anything.

``foreground=True`` runs the worker in this process (no fork, logging to
stderr) and returns its exit status; ``ready.ok()``/``fail()`` then only log.

Call it outside ``trio.run`` (a fork inside a running trio loop leaves the
child unable to start its own).  The worker typically calls ``trio.run``.
"""

from __future__ import annotations

import errno as _errno
import logging
import os
import sys
import traceback
from collections.abc import Callable
from typing import IO

from .errors import ErofsMountError, leaf_error

__all__ = ["Readiness", "run_detached", "log_dir", "log_path", "setup_logging"]

_READY_TIMEOUT_HINT = "see the log"


def log_dir() -> str:
    """/var/log/erofs-mount for root; $XDG_STATE_HOME/erofs-mount (~/.local/state/...) otherwise."""
    if os.geteuid() == 0:
        return "/var/log/erofs-mount"
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(state, "erofs-mount")


def log_path(name: str) -> str:
    """``<log_dir()>/<name>.log`` (the directory is created when the daemon opens it)."""
    return os.path.join(log_dir(), f"{name}.log")


def setup_logging(stream: IO[str] | None = None, level: int = logging.INFO) -> None:
    """Timestamped lines with the pid, to ``stream`` (default stderr, i.e. the log file)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s erofs-mount[%(process)d] %(levelname)s %(message)s"))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)


class Readiness:
    """The worker's one-shot report to the waiting command: ``ok()`` or ``fail(message)``."""

    def __init__(self, fd: int | None) -> None:
        self._fd = fd
        self.reported: str | None = None

    def _send(self, line: str) -> None:
        if self.reported is not None:
            return
        self.reported = line
        if self._fd is None:
            logging.getLogger("erofs_mount").info("readiness: %s", line)
            return
        try:
            os.write(self._fd, (line.replace("\n", " ") + "\n").encode(errors="replace"))
        except OSError:
            pass  # the command went away; keep serving
        finally:
            os.close(self._fd)
            self._fd = None

    def ok(self) -> None:
        self._send("ok")

    def fail(self, message: str, errno: int = _errno.EIO) -> None:
        self._send(f"err {errno} {message}")


def _open_log(log_file: str) -> int:
    os.makedirs(os.path.dirname(log_file) or ".", mode=0o700, exist_ok=True)
    return os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)


def _run_worker(worker: Callable[[Readiness], int | None], ready: Readiness) -> int:
    try:
        rc = worker(ready)
    except BaseException as exc:  # noqa: BLE001 - the daemon's last words go to its log
        leaf = leaf_error(exc)
        if isinstance(leaf, ErofsMountError):
            logging.getLogger("erofs_mount").error("%s", leaf)
            ready.fail(str(leaf), leaf.errno)
        else:
            traceback.print_exc()
            ready.fail(f"daemon failed: {type(leaf).__name__}: {leaf}")
        return 1
    if ready.reported is None:
        ready.fail("daemon exited before it was ready")
    return int(rc or 0)


def run_detached(worker: Callable[[Readiness], int | None], *, log_file: str, foreground: bool = False) -> int:
    """Run ``worker`` as a detached daemon; return 0 once it said ``ok()`` (see module doc)."""
    if foreground:
        setup_logging()
        return _run_worker(worker, Readiness(None))

    log_fd = _open_log(log_file)  # fails here, in the caller, with a clear OSError
    rfd, wfd = os.pipe2(os.O_CLOEXEC)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # first child
        try:
            os.close(rfd)
            os.setsid()
            if os.fork() != 0:
                os._exit(0)
            # the daemon: no controlling terminal, not our caller's child
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, 0)
            os.dup2(log_fd, 1)
            os.dup2(log_fd, 2)
            os.close(devnull)
            os.close(log_fd)
            os.chdir("/")
            sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
            sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
            setup_logging()
            rc = _run_worker(worker, Readiness(wfd))
        except BaseException:  # noqa: BLE001
            try:
                traceback.print_exc()
            finally:
                os._exit(1)
        logging.shutdown()
        os._exit(rc)

    os.close(wfd)
    os.close(log_fd)
    os.waitpid(pid, 0)  # the first child exits at once
    chunks = []
    with os.fdopen(rfd, "rb") as pipe:
        while True:  # EOF when the daemon reported or died
            chunk = pipe.read(4096)
            if not chunk:
                break
            chunks.append(chunk)
    line = b"".join(chunks).decode(errors="replace").strip()
    if line == "ok":
        return 0
    if line.startswith("err "):
        _, code, message = (line.split(" ", 2) + [""])[:3]
        raise ErofsMountError(message or "daemon failed", errno=int(code) if code.isdigit() else _errno.EIO)
    raise ErofsMountError(f"daemon exited before it was ready ({_READY_TIMEOUT_HINT}: {log_file})")
