"""Tiny helpers for the UML guest's init (no kmod/halt binaries needed): load a module, power off.

    python3 guest_helper.py insmod /path/mod.ko [params]
    python3 guest_helper.py poweroff
"""

import ctypes
import os
import sys

libc = ctypes.CDLL(None, use_errno=True)
SYS_finit_module = 313  # x86_64 (UML uses the host architecture's table)
RB_POWER_OFF = 0x4321FEDC


def insmod(path: str, params: str = "") -> int:
    fd = os.open(path, os.O_RDONLY)
    rc = libc.syscall(SYS_finit_module, fd, params.encode(), 0)
    err = ctypes.get_errno()
    os.close(fd)
    if rc != 0 and err != 17:  # EEXIST: already loaded
        print(f"insmod {path}: {os.strerror(err)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "insmod":
        raise SystemExit(insmod(sys.argv[2], " ".join(sys.argv[3:])))
    if sys.argv[1] == "poweroff":
        os.sync()
        libc.reboot(RB_POWER_OFF)
        raise SystemExit(f"reboot: {os.strerror(ctypes.get_errno())}")
    raise SystemExit(f"unknown command {sys.argv[1]}")
