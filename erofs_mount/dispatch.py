"""Route mount actions to a backend: NBD (root + the kernel's nbd netlink family) or FUSE."""

from __future__ import annotations

from .errors import UsageError
from .options import MountOptions


def run(action: str, arg, opts: MountOptions) -> int:
    raise UsageError(f"'{action}' is not available yet: mounting lands with the FUSE and NBD backends")
