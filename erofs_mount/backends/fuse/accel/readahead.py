"""The FUSE mount's read-ahead window (``/sys/class/bdi/MAJ:MIN/read_ahead_kb`` of its superblock).

The kernel gives a new FUSE mount 128 KiB of read-ahead, and the size of its READ requests follows
the window (up to the ``max_pages`` agreed at FUSE_INIT).  For compressed images a larger window
means fewer, larger READs, each decoded in one pass (config.COMPRESSED_READ_AHEAD_KB says how much
it gained).  Only root may write the setting; the window is the mount's own and goes with it.
"""

from __future__ import annotations

import os

BDI_ROOT = "/sys/class/bdi"
KERNEL_DEFAULT_KB = 128     # what the kernel gives a new FUSE mount


FETCHING, UNCACHED, LOCAL = "fetching", "uncached", "local"


def blob_state(source) -> str | None:
    """Where a registry source's blob is: ``FETCHING`` (its persistent cache is not complete yet),
    ``UNCACHED`` (no persistent cache: always fetched), ``LOCAL`` (the cache holds it all); None for
    sources this does not apply to (local files, tar layers).  A registry mount still fetching gains
    from big READs, a warm one loses (measured in one run on bench_verity's 121 MiB uncompressed
    file: cold 0.40 of the time with 1 MiB READs, warm 1.96 — its 128 KiB READs are answered inline
    from the page cache)."""
    inner = getattr(source, "inner", None)      # a verified source (verity/source.py)
    if inner is not None and not hasattr(source, "disk"):
        return blob_state(inner)
    parts = getattr(source, "sources", None)    # the layers of a merged image (openers._Layers)
    if parts is not None:
        states = {blob_state(s) for s in parts}
        for state in (None, UNCACHED, FETCHING):
            if state in states:
                return state
        return LOCAL
    if not hasattr(source, "digest") or not hasattr(source, "disk"):
        return None
    disk = source.disk
    if disk is None:
        return UNCACHED
    try:    # has() reads the entry's bitmap again: another mount may have filled the rest
        return LOCAL if disk.complete or disk.has(0, source.size) else FETCHING
    except (OSError, ValueError):
        return FETCHING


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
