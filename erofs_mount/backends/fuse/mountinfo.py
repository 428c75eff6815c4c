"""Finding a mount in /proc/self/mountinfo without touching the mount point itself.

A dead FUSE mount (its daemon killed) answers ``stat`` with ENOTCONN, so the
mount point is matched by its absolute path only (proc(5), mountinfo fields;
octal escapes as the kernel's ``show_mountinfo``/``mangle`` writes them).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_OCTAL = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True, slots=True)
class MountEntry:
    mount_id: int
    mountpoint: str
    fstype: str
    source: str
    options: str          # per-mount options (ro, nosuid, ...)
    super_options: str    # filesystem options (user_id=, default_permissions, ...)


def _unescape(field: str) -> str:
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[MountEntry]:
    out = []
    for line in text.splitlines():
        parts = line.split(" ")
        try:
            sep = parts.index("-", 6)
            out.append(MountEntry(int(parts[0]), _unescape(parts[4]), parts[sep + 1],
                                  _unescape(parts[sep + 2]), parts[5], parts[sep + 3] if len(parts) > sep + 3 else ""))
        except (ValueError, IndexError):
            continue
    return out


def find_mount(mountpoint: str, mountinfo: str = "/proc/self/mountinfo") -> MountEntry | None:
    """The topmost mount on ``mountpoint`` (an absolute path), or None."""
    try:
        with open(mountinfo, encoding="utf-8", errors="surrogateescape") as f:
            entries = parse_mountinfo(f.read())
    except OSError:
        return None
    path = mountpoint.rstrip("/") or "/"
    hits = [e for e in entries if e.mountpoint == path]
    return hits[-1] if hits else None
