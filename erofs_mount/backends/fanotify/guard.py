"""The guard of fanotify mode: the fallback deny when the holder (and with it the pre-content group)
is gone, so that a hole is never read as zeros.

A second group, of class FAN_CLASS_CONTENT, with a FAN_ACCESS_PERM mark on the sparse file.  For
a read of the backing file the kernel asks the pre-content groups first (FAN_PRE_ACCESS: the
holder, which waits for the data) and the content groups after (``fsnotify_file_area_perm``).
FAN_ACCESS_PERM events carry no range, so the guard decides per read:

    the holder is alive (its POSIX lock on ``lock`` is held)   -> allow (the holder made it local)
    the holder is gone and the file has no hole                 -> allow
    the holder is gone and the file still has holes             -> deny (the reader gets EIO)

Why the lock and not the holder's pid: a dying process drops its POSIX locks while closing its
files (``filp_flush`` -> ``locks_remove_posix``), while the group is released later, from the
deferred ``__fput`` of its last file; the accesses that the release lets through therefore find the
lock gone.  The guard removes its mark once the file has no hole, and exits with the mount.

    python -m erofs_mount.backends.fanotify.guard DATA LOCK MOUNTPOINT
"""

from __future__ import annotations

import fcntl
import logging
import os
import sys

from . import kernel, wire
from .holder import Keeper, serve_process

log = logging.getLogger("erofs_mount.fanotify.guard")


class Guard(Keeper):
    def __init__(self, data: str, lock_path: str, mountpoint: str) -> None:
        super().__init__(data, mountpoint, kernel.guard_group(), wire.FAN_ACCESS_PERM, os.O_RDONLY)
        self.lock = os.open(lock_path, os.O_RDWR | os.O_CLOEXEC)
        self.denied = 0

    def holder_alive(self) -> bool:
        try:
            fcntl.lockf(self.lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.lockf(self.lock, fcntl.LOCK_UN)
        return False

    def on_group(self) -> None:
        events = kernel.read_events(self.group)
        verdict = None
        for ev in events:
            if ev.fd < 0:
                continue
            if ev.needs_response:
                if verdict is None:
                    verdict = self.holder_alive() or self.complete()
                os.write(self.group, wire.allow(ev.fd) if verdict else wire.deny(ev.fd))
                if not verdict:
                    self.denied += 1
                    if self.denied in (1, 10, 100) or self.denied % 1000 == 0:
                        log.error("the holder is gone and %s has holes: read denied (%d so far)",
                                  self.data, self.denied)
            os.close(ev.fd)

    def close(self) -> None:
        super().close()
        log.info("guard exits (%d reads denied)", self.denied)


def main(argv: list[str]) -> int:
    data, lock_path, mountpoint = argv
    return serve_process("guard", lambda: Guard(data, lock_path, mountpoint))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
