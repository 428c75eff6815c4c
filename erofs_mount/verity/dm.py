"""NBD mode's verified reads: a dm-verity device over /dev/nbdN, made with device-mapper ioctls.

No dmsetup/veritysetup at run time (and no udev): the ioctls of include/uapi/linux/dm-ioctl.h on
/dev/mapper/control — DM_DEV_CREATE, DM_TABLE_LOAD (one ``verity`` target, read-only),
DM_DEV_SUSPEND (resume: the table goes live) — then a block node ``/dev/mapper/NAME`` made by us
when udev did not.  The table is dm-verity's (Documentation/admin-guide/device-mapper/verity.rst):

    <version> <data_dev> <hash_dev> <data_block_size> <hash_block_size> <num_data_blocks>
    <hash_start_block> <algorithm> <root_digest> <salt>

with the NBD device as both data and hash device (the tree is appended to the image).  The kernel
checks every block it reads; a mismatch is EIO (and a "verity: … is corrupted" kernel message).
``remove(name)`` is DM_DEV_REMOVE; the NBD device is released with it, so its autoclear disconnect
ends the daemon.  Names are ``erofs-nbdN``: ``nbd_index_of(path)`` maps a mount source back.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import os
import stat
import struct
import time

from ..errors import ErofsMountError
from .tree import Params

CONTROL = "/dev/mapper/control"
MAPPER = "/dev/mapper"
PREFIX = "erofs-nbd"
_VERSION = (4, 0, 0)
_IOCTL = struct.Struct("<3IIIIiIIIQ128s129s7s")  # struct dm_ioctl
_SPEC = struct.Struct("<QQiI16s")               # struct dm_target_spec
assert _IOCTL.size == 312 and _SPEC.size == 40
DM_DEV_CREATE, DM_DEV_REMOVE, DM_DEV_SUSPEND, DM_DEV_STATUS, DM_TABLE_LOAD, DM_TABLE_STATUS = 3, 4, 6, 7, 9, 12
DM_READONLY_FLAG = 1 << 0
DM_STATUS_TABLE_FLAG = 1 << 4
BUF = 16384


def _nr(cmd: int) -> int:
    return (3 << 30) | (_IOCTL.size << 16) | (0xFD << 8) | cmd  # _IOWR(DM_IOCTL, cmd, struct dm_ioctl)


def verity_table(p: Params, data_dev: str, hash_start: int, root: bytes) -> str:
    """The verity target's parameters (devices as MAJOR:MINOR or a path)."""
    return (f"1 {data_dev} {data_dev} {p.data_block_size} {p.hash_block_size} {p.data_blocks} {hash_start} "
            f"{p.algorithm} {root.hex()} {p.salt.hex() or '-'}")


def _header(name: str, *, flags: int = 0, data: bytes = b"", targets: int = 0) -> bytearray:
    size = max(BUF, _IOCTL.size + len(data))
    buf = bytearray(size)
    _IOCTL.pack_into(buf, 0, *_VERSION, size, _IOCTL.size, targets, 0, flags, 0, 0, 0,
                     name.encode()[:127], b"", b"")
    buf[_IOCTL.size:_IOCTL.size + len(data)] = data
    return buf


def _call(cmd: int, buf: bytearray, what: str) -> bytearray:
    try:
        fd = os.open(CONTROL, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ErofsMountError(f"{what}: {CONTROL} is absent (device-mapper not loaded: modprobe dm-verity)",
                              errno=_errno.ENODEV) from None
    except OSError as exc:
        raise ErofsMountError(f"{what}: {CONTROL}: {exc.strerror}", errno=exc.errno) from None
    try:
        # through ctypes, which lets go of the GIL: fcntl.ioctl keeps it, and a table load opens
        # /dev/nbdN, whose first read (the partition scan) this very process must answer
        arg = (ctypes.c_char * len(buf)).from_buffer(buf)
        if _libc().ioctl(fd, ctypes.c_ulong(_nr(cmd)), arg) != 0:
            err = ctypes.get_errno()
            raise ErofsMountError(f"{what}: {os.strerror(err)}", errno=err)
    finally:
        os.close(fd)
    return buf


_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
    return _LIBC


def _dev(buf: bytearray) -> int:
    return _IOCTL.unpack_from(buf)[10]


def create_verity(name: str, data_dev: str, p: Params, hash_start: int, root: bytes) -> str:
    """Create and activate ``name``; the path of its block node."""
    st = os.stat(data_dev)
    if not stat.S_ISBLK(st.st_mode):
        raise ErofsMountError(f"{data_dev} is not a block device", errno=_errno.ENOTBLK)
    devno = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    params = verity_table(p, devno, hash_start, root).encode() + b"\0"
    sectors = p.data_blocks * p.data_block_size // 512
    spec_len = (_SPEC.size + len(params) + 7) // 8 * 8
    spec = _SPEC.pack(0, sectors, 0, spec_len, b"verity") + params
    spec = spec.ljust(spec_len, b"\0")
    what = f"dm-verity device {name} over {data_dev}"
    out = _call(DM_DEV_CREATE, _header(name), what)
    try:
        _call(DM_TABLE_LOAD, _header(name, flags=DM_READONLY_FLAG, data=spec, targets=1), what)
        out = _call(DM_DEV_SUSPEND, _header(name), what)  # no DM_SUSPEND_FLAG: resume, the table goes live
        return _node(name, _dev(out))
    except BaseException:
        remove(name, quiet=True)
        raise


def _node(name: str, dev: int) -> str:
    """/dev/mapper/NAME (udev's name), made here when no udev did; /dev/dm-N works too."""
    path = os.path.join(MAPPER, name)
    want = os.makedev(os.major(dev), os.minor(dev))
    for _ in range(20):  # a running udev may make it: a moment, bounded
        try:
            st = os.stat(path)
            if stat.S_ISBLK(st.st_mode) and st.st_rdev == want:
                return path
            os.unlink(path)  # a stale node of an earlier device
        except FileNotFoundError:
            break
        time.sleep(0.01)
    os.makedirs(MAPPER, exist_ok=True)
    try:
        os.mknod(path, 0o600 | stat.S_IFBLK, want)
    except FileExistsError:
        pass
    return path


def remove(name: str, *, quiet: bool = False, retries: int = 20) -> bool:
    """Remove the device (retried a moment while it is still busy); its node too.  True if removed."""
    for attempt in range(retries):
        try:
            _call(DM_DEV_REMOVE, _header(name), f"removing dm device {name}")
            break
        except ErofsMountError as exc:
            if exc.errno == _errno.ENXIO:  # no such device: gone already
                break
            if exc.errno != _errno.EBUSY or attempt == retries - 1:
                if quiet:
                    return False
                raise
            time.sleep(0.05)
    try:
        os.unlink(os.path.join(MAPPER, name))
    except OSError:
        pass
    return True


def table(name: str) -> str | None:
    """The live table's verity parameters of ``name``, or None when there is no such device."""
    try:
        buf = _call(DM_TABLE_STATUS, _header(name, flags=DM_STATUS_TABLE_FLAG), f"dm device {name}")
    except ErofsMountError:
        return None
    fields = _IOCTL.unpack_from(buf)
    data_start, targets = fields[4], fields[5]
    if not targets:
        return ""
    _start, _len, _status, _next, ttype = _SPEC.unpack_from(buf, data_start)
    raw = bytes(buf[data_start + _SPEC.size:]).split(b"\0", 1)[0]
    return f"{ttype.rstrip(bytes(1)).decode()} {raw.decode()}"


def status(name: str) -> str | None:
    """The verity target's status: "V" (verified so far) or "C" (a corruption was detected)."""
    try:
        buf = _call(DM_TABLE_STATUS, _header(name), f"dm device {name}")
    except ErofsMountError:
        return None
    fields = _IOCTL.unpack_from(buf)
    if not fields[5]:
        return ""
    return bytes(buf[fields[4] + _SPEC.size:]).split(b"\0", 1)[0].decode()


def name_for(index: int) -> str:
    return f"{PREFIX}{index}"


def nbd_index_of(source: str) -> int | None:
    """N for a mount source ``/dev/mapper/erofs-nbdN`` (ours), else None."""
    base = os.path.basename(source)
    if os.path.dirname(source) == MAPPER and base.startswith(PREFIX) and base[len(PREFIX):].isdigit():
        return int(base[len(PREFIX):])
    return None
