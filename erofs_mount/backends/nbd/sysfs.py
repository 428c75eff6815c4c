"""What sysfs and /proc say about NBD devices (small synchronous reads).

Facts (Linux 6.1, ../shared/docs/testing.md): ``/sys/block/nbdN/pid`` and
``backend`` exist only while the device is configured and ``pid`` is NOT
updated on reattach, so neither tells whether a server is alive; after
disconnect ``size`` is 0.
"""

from __future__ import annotations

import errno as _errno
import os
import re
import stat
from dataclasses import dataclass

from ...errors import ErofsMountError, NotFoundError

NBD_MAJOR = 43  # include/uapi/linux/major.h
SYS_BLOCK = "/sys/block"


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            return f.read()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError:
        return None


def module_loaded() -> bool:
    return os.path.isdir("/sys/module/nbd")


def indexes() -> list[int]:
    """Every nbdN that exists now."""
    try:
        names = os.listdir(SYS_BLOCK)
    except OSError:
        return []
    return sorted(int(n[3:]) for n in names if re.fullmatch(r"nbd\d+", n))


def backend(index: int) -> str | None:
    """The backend identifier (our recovery-record path), or None."""
    text = _read(f"{SYS_BLOCK}/nbd{index}/backend")
    if text is None:
        return None
    text = text.rstrip("\n")
    return text or None


def pid(index: int) -> int | None:
    text = _read(f"{SYS_BLOCK}/nbd{index}/pid")
    try:
        return int(text) if text else None
    except ValueError:
        return None


def size_bytes(index: int) -> int:
    text = _read(f"{SYS_BLOCK}/nbd{index}/size")  # in 512-byte sectors
    try:
        return int(text) * 512 if text else 0
    except ValueError:
        return 0


def in_use(index: int) -> bool:
    """Configured (has a pid or a backend), like erofs-utils ``erofs_nbd_devscan``."""
    base = f"{SYS_BLOCK}/nbd{index}"
    return os.path.exists(base + "/pid") or os.path.exists(base + "/backend") or size_bytes(index) > 0


def free_indexes() -> list[int]:
    return [i for i in indexes() if not in_use(i)]


def device_path(index: int) -> str:
    return f"/dev/nbd{index}"


def index_of(device: str) -> int:
    """``/dev/nbdN`` (or any node with major 43) → N."""
    try:
        st = os.stat(device)
    except FileNotFoundError:
        raise NotFoundError(f"{device}: no such device") from None
    if not stat.S_ISBLK(st.st_mode) or os.major(st.st_rdev) != NBD_MAJOR:
        raise ErofsMountError(f"{device}: not an NBD block device", errno=_errno.ENOTBLK)
    uevent = _read(f"/sys/dev/block/{NBD_MAJOR}:{os.minor(st.st_rdev)}/uevent") or ""
    m = re.search(r"^DEVNAME=nbd(\d+)$", uevent, re.M)
    if m:
        return int(m.group(1))
    m = re.fullmatch(r"/dev/nbd(\d+)", device)
    if m:
        return int(m.group(1))
    raise ErofsMountError(f"{device}: cannot tell which nbd device this is", errno=_errno.ENOTBLK)


def ensure_device_node(index: int) -> str:
    """Create /dev/nbdN when devtmpfs did not (containers, minimal guests)."""
    path = device_path(index)
    if not os.path.exists(path):
        dev = (_read(f"{SYS_BLOCK}/nbd{index}/dev") or "").strip()
        if dev:
            major, minor = (int(x) for x in dev.split(":"))
            os.mknod(path, 0o660 | stat.S_IFBLK, os.makedev(major, minor))
    return path


@dataclass(frozen=True, slots=True)
class Mount:
    source: str
    mountpoint: str
    fstype: str
    options: str


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts() -> list[Mount]:
    text = _read("/proc/self/mountinfo") or ""
    out = []
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        lf, rf = left.split(), right.split()
        if len(lf) < 6 or len(rf) < 3:
            continue
        out.append(Mount(_unescape(rf[1]), _unescape(lf[4]), rf[0], lf[5]))
    return out


def mountpoints_of(index: int) -> list[str]:
    """Where /dev/nbdN is mounted, directly or through its dm-verity device (verity/dm.py)."""
    devs = (device_path(index), f"/dev/mapper/erofs-nbd{index}")
    return [m.mountpoint for m in mounts() if m.source in devs]


def mount_at(mountpoint: str) -> Mount | None:
    target = os.path.realpath(mountpoint)
    found = None
    for m in mounts():
        if m.mountpoint == target:
            found = m  # the last one is on top
    return found
