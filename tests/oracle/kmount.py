"""Loop-mount EROFS images read-only with the host kernel (the oracle), always cleaned up.

``kernel_unavailable_reason()`` says why the oracle cannot run here (not root, no
/dev/loop-control, no erofs driver, missing tools) or None.  ``kernel_mount(image,
devices, mountpoint)`` is a context manager: it attaches each file read-only to a
loop device, mounts ``-t erofs -o ro[,device=/dev/loopN...]`` and, whatever
happens, unmounts and detaches every loop device it attached (each command with a
timeout).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence

TIMEOUT = 30


def _run(*args: str, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)


def _erofs_driver() -> bool:
    def listed() -> bool:
        try:
            with open("/proc/filesystems") as f:
                return any(line.split()[-1:] == ["erofs"] for line in f)
        except OSError:
            return False
    if listed():
        return True
    if shutil.which("modprobe"):
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            _run("modprobe", "erofs", timeout=20)
    return listed()


def kernel_unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "the kernel oracle needs root (loop devices and mount)"
    if not os.path.exists("/dev/loop-control"):
        return "/dev/loop-control is absent (no loop driver)"
    for tool in ("losetup", "mount", "umount"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not _erofs_driver():
        return "the host kernel has no erofs driver (not in /proc/filesystems, modprobe erofs failed)"
    return None


def mkfs15_unavailable_reason() -> str | None:
    exe = shutil.which("mkfs.erofs")
    if exe is None:
        return "mkfs.erofs is not installed (Debian package erofs-utils)"
    try:
        out = _run(exe, "-V", timeout=10)
    except (subprocess.SubprocessError, OSError) as exc:
        return f"mkfs.erofs does not run: {exc}"
    if "mkfs.erofs 1.5" not in out.stdout + out.stderr:
        return "mkfs.erofs is not Debian's 1.5 (the configurations here are 1.5's)"
    return None


def _losetup(path: str) -> str:
    last = None
    for _ in range(5):   # bounded: another test may race us for the same free loop device
        r = _run("losetup", "--find", "--show", "--read-only", path)
        if r.returncode == 0 and r.stdout.strip().startswith("/dev/loop"):
            return r.stdout.strip()
        last = r.stderr.strip()
        time.sleep(0.2)
    raise RuntimeError(f"losetup {path}: {last}")


def _detach(dev: str) -> None:
    for _ in range(10):
        r = _run("losetup", "-d", dev)
        if r.returncode == 0 or "No such device" in r.stderr:
            return
        time.sleep(0.2)


def _umount(mnt: str) -> None:
    for _ in range(10):
        r = _run("umount", mnt)
        if r.returncode == 0 or not os.path.ismount(mnt):
            return
        time.sleep(0.2)
    _run("umount", "-l", mnt)


@contextlib.contextmanager
def kernel_mount(image: str | os.PathLike, mountpoint: str | os.PathLike,
                 devices: Sequence[str | os.PathLike] = ()) -> Iterator[str]:
    """Mount ``image`` (+ extra ``devices``) read-only at ``mountpoint``; yields the mountpoint."""
    loops: list[str] = []
    mnt = os.fspath(mountpoint)
    os.makedirs(mnt, exist_ok=True)
    mounted = False
    try:
        primary = _losetup(os.fspath(image))
        loops.append(primary)
        opts = ["ro"]
        for dev in devices:
            loop = _losetup(os.fspath(dev))
            loops.append(loop)
            opts.append(f"device={loop}")
        r = _run("mount", "-t", "erofs", "-o", ",".join(opts), primary, mnt)
        if r.returncode != 0:
            dmesg = _run("dmesg").stdout.strip().splitlines()[-5:]
            raise RuntimeError(f"kernel refused to mount {image}: {r.stderr.strip()} | dmesg: {dmesg}")
        mounted = True
        yield mnt
    finally:
        if mounted:
            _umount(mnt)
        for loop in reversed(loops):
            _detach(loop)
