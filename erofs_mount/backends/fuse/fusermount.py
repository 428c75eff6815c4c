"""Mounting through ``fusermount3`` (unprivileged users) and unmounting (``-u``)."""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import socket
import subprocess
import sys

from ...errors import ErofsMountError
from .mountinfo import find_mount

log = logging.getLogger("erofs_mount.fuse")

_MONITORS: list = []  # (fusermount3 process, socket fd) kept for auto_unmount


def fusermount_mount(mountpoint: str, options: set[str]) -> int:
    """Mount with ``fusermount3`` (setuid) and receive the /dev/fuse descriptor it opened.

    The protocol libfuse uses (lib/mount.c, fuse_mount_fusermount): the socket in ``_FUSE_COMMFD``
    carries the descriptor back as SCM_RIGHTS; fusermount3 exits once it sent it.
    """
    mount_opts = ",".join(sorted(o for o in options if o != "debug"))
    # with auto_unmount fusermount3 stays alive, watching the socket, and unmounts when we die
    monitor = "auto_unmount" in options
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with parent:
        env = dict(os.environ, _FUSE_COMMFD=str(child.fileno()))
        try:
            proc = subprocess.Popen(["fusermount3", "-o", mount_opts, "--", mountpoint], env=env,
                                    pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL,
                                    stderr=None if monitor else subprocess.PIPE, text=True)
        except OSError as exc:
            child.close()
            raise ErofsMountError(f"cannot run fusermount3: {exc.strerror} (install the fuse3 package)",
                                  errno=exc.errno or errno.ENOENT) from None
        child.close()
        try:
            _msg, fds, _flags, _addr = socket.recv_fds(parent, 1, 1)
        except OSError:
            fds = []
        if monitor and fds:
            _MONITORS.append((proc, parent.detach()))  # the socket must stay open while we serve
            return fds[0]
        try:
            err = proc.communicate(timeout=60)[1]
        except subprocess.TimeoutExpired:
            proc.kill()
            err = proc.communicate()[1]
    if proc.returncode != 0 or not fds:
        for fd in fds:
            os.close(fd)
        lines = [line.removeprefix("fusermount3: ") for line in (err or "").strip().splitlines()]
        raise ErofsMountError(f"{mountpoint}: {lines[-1] if lines else 'fusermount3 failed'}", errno=errno.EPERM)
    return fds[0]


def fusermount_unmount(mountpoint: str) -> None:
    for cmd in (["fusermount3", "-u", "-q", "--", mountpoint], ["fusermount3", "-u", "-q", "-z", "--", mountpoint]):
        res = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if res.returncode == 0 or find_mount(mountpoint) is None:
            return
        log.warning("%s: %s", " ".join(cmd), res.stderr.strip())


MNT_DETACH = 2


def _umount2(path: str, flags: int = 0) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(os.fsencode(path), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)


def unmount(mountpoint: str, *, lazy: bool = False) -> int:
    """Unmount a FUSE mount (also a dead one whose daemon was killed); 0 or 1 with a one-line error."""
    mnt = os.path.abspath(mountpoint)
    entry = find_mount(mnt)
    if entry is None:
        print(f"erofs-mount: {mnt}: not mounted", file=sys.stderr)
        return 1
    if not entry.fstype.startswith("fuse"):
        print(f"erofs-mount: {mnt}: not a FUSE mount ({entry.fstype})", file=sys.stderr)
        return 1
    try:
        if os.geteuid() == 0:
            _umount2(mnt, MNT_DETACH if lazy else 0)
        else:
            cmd = ["fusermount3", "-u", *(["-z"] if lazy else []), "--", mnt]
            res = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
            if res.returncode != 0:
                msg = (res.stderr.strip().splitlines() or ["fusermount3 failed"])[-1]
                raise OSError(errno.EPERM, msg.removeprefix("fusermount3: "), mnt)
    except OSError as exc:
        hint = " (busy: close the files using it, or unmount lazily)" if exc.errno == errno.EBUSY else ""
        print(f"erofs-mount: {mnt}: {exc.strerror}{hint}", file=sys.stderr)
        return 1
    from .publish import forget

    forget(mnt)  # the status document of a daemon that was killed
    return 0


