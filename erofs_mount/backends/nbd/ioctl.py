"""The ioctl NBD interface (``include/uapi/linux/nbd.h``): the fallback when the kernel has no
"nbd" generic netlink family.  No backend identifier, no RECONFIGURE: reattach is unavailable.

``configure`` sets the device up on an open ``/dev/nbdN``; ``do_it`` blocks (run it in a
thread: ``fcntl.ioctl`` releases the GIL) until the device is disconnected.
"""

from __future__ import annotations

import errno as _errno
import fcntl
import os

from ...errors import ErofsMountError
from .proto import NBD_FLAG_READ_ONLY


def _io(nr: int) -> int:
    return (0xAB << 8) | nr  # _IO(0xab, nr)


NBD_SET_SOCK = _io(0)
NBD_SET_BLKSIZE = _io(1)
NBD_SET_SIZE = _io(2)
NBD_DO_IT = _io(3)
NBD_CLEAR_SOCK = _io(4)
NBD_CLEAR_QUE = _io(5)
NBD_SET_SIZE_BLOCKS = _io(7)
NBD_DISCONNECT = _io(8)
NBD_SET_TIMEOUT = _io(9)
NBD_SET_FLAGS = _io(10)


def _ioctl(fd: int, request: int, arg: int, what: str) -> None:
    try:
        fcntl.ioctl(fd, request, arg)
    except OSError as exc:
        raise ErofsMountError(f"nbd ioctl {what}: {exc.strerror}", errno=exc.errno or _errno.EIO) from None


def open_device(index: int) -> int:
    try:
        return os.open(f"/dev/nbd{index}", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise ErofsMountError(f"/dev/nbd{index}: {exc.strerror}", errno=exc.errno or _errno.EIO) from None


def configure(nbd_fd: int, sock_fd: int, *, size_bytes: int, block_size: int) -> None:
    """CLEAR_SOCK, SET_BLKSIZE, SET_SIZE_BLOCKS, SET_TIMEOUT 0, SET_FLAGS read-only, SET_SOCK."""
    _ioctl(nbd_fd, NBD_CLEAR_SOCK, 0, "CLEAR_SOCK")
    _ioctl(nbd_fd, NBD_SET_BLKSIZE, block_size, "SET_BLKSIZE")
    _ioctl(nbd_fd, NBD_SET_SIZE_BLOCKS, size_bytes // block_size, "SET_SIZE_BLOCKS")
    _ioctl(nbd_fd, NBD_SET_TIMEOUT, 0, "SET_TIMEOUT")
    _ioctl(nbd_fd, NBD_SET_FLAGS, NBD_FLAG_READ_ONLY, "SET_FLAGS")
    _ioctl(nbd_fd, NBD_SET_SOCK, sock_fd, "SET_SOCK")


def do_it(nbd_fd: int) -> int:
    """Blocks while the device runs; 0 on a normal disconnect (EPIPE, like nbd-client)."""
    try:
        fcntl.ioctl(nbd_fd, NBD_DO_IT, 0)
    except OSError as exc:
        if exc.errno == _errno.EPIPE:
            return 0
        return exc.errno or _errno.EIO
    return 0


def disconnect(index: int) -> None:
    fd = open_device(index)
    try:
        _ioctl(fd, NBD_DISCONNECT, 0, "DISCONNECT")
        try:
            fcntl.ioctl(fd, NBD_CLEAR_SOCK, 0)
        except OSError:
            pass
    finally:
        os.close(fd)
