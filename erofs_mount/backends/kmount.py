"""mount(2) and umount2(2) for the modes where the kernel mounts (NBD's /dev/nbdN, fanotify's sparse
file, a whole image's overlayfs): one ctypes binding and one error shape for all of them.

    mount(source, target, fstype, flags=0, data=None)   always read-only (MS_RDONLY added: EROFS is,
                                                         and a read-only device says EACCES without it)
    umount(target, detach=False)

Failures raise ErofsMountError with the errno: ``mount SOURCE on TARGET: <strerror> (see dmesg)``,
``umount TARGET: <strerror>``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

from ..errors import ErofsMountError

MS_RDONLY = 1
MNT_DETACH = 2

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def mount(source: str, target: str, fstype: str, flags: int = 0, data: str | None = None) -> None:
    if _libc.mount(os.fsencode(source), os.fsencode(target), fstype.encode(), flags | MS_RDONLY,
                   data.encode() if data else None) != 0:
        err = ctypes.get_errno()
        raise ErofsMountError(f"mount {source} on {target}: {os.strerror(err)} (see dmesg)", errno=err)


def umount(target: str, *, detach: bool = False) -> None:
    if _libc.umount2(os.fsencode(target), MNT_DETACH if detach else 0) != 0:
        err = ctypes.get_errno()
        raise ErofsMountError(f"umount {target}: {os.strerror(err)}", errno=err)
