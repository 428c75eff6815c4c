"""The FUSE mount's read-ahead window (``/sys/class/bdi/MAJ:MIN/read_ahead_kb`` of its superblock).

The kernel gives a new FUSE mount 128 KiB of read-ahead, and the size of its READ requests follows
the window (up to the ``max_pages`` agreed at FUSE_INIT).  For compressed images a larger window
means fewer, larger READs, each decoded in one pass (config.COMPRESSED_READ_AHEAD_KB says how much
it gained).  Only root may write the setting; the window is the mount's own and goes with it.
"""

from __future__ import annotations

import os

BDI_ROOT = "/sys/class/bdi"


def bdi_setting(st_dev: int) -> str:
    """The read_ahead_kb file of the backing device info of the filesystem with device ``st_dev``."""
    return os.path.join(BDI_ROOT, f"{os.major(st_dev)}:{os.minor(st_dev)}", "read_ahead_kb")


def set_read_ahead_kb(st_dev: int, kb: int) -> str | None:
    """Set the window; None when done, else why not (one line)."""
    path = bdi_setting(st_dev)
    try:
        with open(path, "w") as f:
            f.write(f"{kb}\n")
    except OSError as exc:
        return f"read_ahead_kb={kb} not set ({path}: {exc.strerror})"
    return None
