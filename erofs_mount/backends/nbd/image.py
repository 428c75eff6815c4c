"""A whole image in NBD mode: one NBD device per layer, mounted by the kernel's erofs driver under
a private directory, and the kernel's overlayfs (read-only: lower directories only) at MNT.

    /run/erofs-mount/images/<key>/L<i>   layer i (0 = the bottom), each an ordinary erofs-mount
                                          NBD mount: its own daemon, recovery record, reattach
    MNT                                   overlay, lowerdir=L<n-1>:…:L0 (the top layer first)

``key`` = sha256 of MNT's real path.  Tar layers carry overlayfs whiteouts in their index
(tarindex/tree.py), EROFS layers made by ``mkfs.erofs --tar``/``--oci`` have them too, so the kernel
applies the OCI changeset rules itself.  ``unmount_image`` takes the overlay down, then every layer
mount (and with it its device and daemon), then the directories.  Every layer is pinned to the
digest resolved once here, so all come from the same image even if the tag moves meanwhile.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import errno as _errno
import hashlib
import os
import shutil

from ...errors import ErofsMountError
from .config import MS_RDONLY, NbdOptions

IMAGES_DIR = "/run/erofs-mount/images"
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def image_dir(mountpoint: str) -> str:
    key = hashlib.sha256(os.path.realpath(mountpoint).encode()).hexdigest()[:32]
    return os.path.join(IMAGES_DIR, key)


def overlay_data(lowers: list[str]) -> str:
    """overlayfs mount data: the top layer first (Documentation/filesystems/overlayfs.rst)."""
    for d in lowers:
        if any(c in d for c in ":,\\"):
            raise ErofsMountError(f"{d}: a layer directory overlayfs cannot name", errno=_errno.EINVAL)
    # xino=on: inode numbers unique across the layers (their own in the low bits, the layer's fsid
    # above), else two files of different layers may show one st_ino, i.e. look hard-linked
    return "lowerdir=" + ":".join(reversed(lowers)) + ",xino=on"


def lower_dirs(super_options: str) -> list[str]:
    """The lowerdir list of an overlay mount's options (top first), '' when none."""
    for opt in super_options.split(","):
        if opt.startswith("lowerdir="):
            return [d for d in opt[len("lowerdir="):].split(":") if d]
    return []


def is_ours(lowers: list[str]) -> bool:
    return bool(lowers) and all(d.startswith(IMAGES_DIR + "/") for d in lowers)


def mount_image(ref: str, mountpoint: str, opts: NbdOptions, oci_options, mount_oci, unmount) -> int:
    """``mount_oci``/``unmount``: lifecycle's single-layer functions (no import cycle)."""
    import trio

    from ...sources.oci.resolve import inspect_oci

    res = trio.run(lambda: inspect_oci(ref, options=oci_options))
    layers = res.manifest.layers
    pinned = str(res.ref)
    base_opts = dataclasses.replace(oci_options, platform=res.platform)
    if len(layers) == 1:
        return mount_oci(pinned, mountpoint, opts, dataclasses.replace(base_opts, blob=layers[0].digest))
    mountpoint = os.path.realpath(mountpoint)
    if not os.path.isdir(mountpoint):
        raise ErofsMountError(f"{mountpoint}: mount point is not a directory", errno=_errno.ENOTDIR)
    base = image_dir(mountpoint)
    if os.path.exists(base):
        raise ErofsMountError(f"{mountpoint}: an image is already mounted there ({base} exists)", errno=_errno.EBUSY)
    os.makedirs(base, mode=0o700)
    mounted: list[str] = []
    try:
        for i, d in enumerate(layers):
            lower = os.path.join(base, f"L{i}")
            os.mkdir(lower, 0o755)
            mount_oci(pinned, lower, opts, dataclasses.replace(base_opts, blob=d.digest))
            mounted.append(lower)
        data = overlay_data(mounted)
        flags = opts.mount_flags | MS_RDONLY
        if _libc.mount(b"overlay", mountpoint.encode(), b"overlay", ctypes.c_ulong(flags), data.encode()) != 0:
            err = ctypes.get_errno()
            raise ErofsMountError(f"mount overlay on {mountpoint}: {os.strerror(err)} (see dmesg)", errno=err)
    except BaseException:
        for lower in reversed(mounted):
            try:
                unmount(lower)
            except ErofsMountError:
                pass
        shutil.rmtree(base, ignore_errors=True)
        raise
    return 0


def unmount_image(mountpoint: str, lowers: list[str], unmount) -> int:
    if _libc.umount2(os.path.realpath(mountpoint).encode(), 0) != 0:
        err = ctypes.get_errno()
        raise ErofsMountError(f"umount {mountpoint}: {os.strerror(err)}", errno=err)
    failed = []
    for lower in lowers:
        try:
            unmount(lower)
            os.rmdir(lower)
        except (ErofsMountError, OSError) as exc:
            failed.append(f"{lower}: {exc}")
    base = os.path.dirname(lowers[0]) if lowers else None
    if base and not failed:
        shutil.rmtree(base, ignore_errors=True)
    if failed:
        raise ErofsMountError(f"{mountpoint}: overlay unmounted, but " + "; ".join(failed))
    return 0
