"""Read-next: the next small file of a walk is read in a worker thread while the walker reads this one.

storeahead.py stores the next file of a listing before its OPEN, but only when its bytes are at
hand inline.  When they are not (a registry blob's range not fetched yet, an image block not in the
page cache, a file of a slow codec bigger than ops.SLOW_INLINE_MAX), storeahead hands the file over
here: a worker thread reads it (the same ``Image.read(nid, 0, size)`` the OPEN's page store makes)
while the walker still reads the current file, and the OPEN that follows takes the result — waiting
for it if it is still being read — and stores it as pagestore.py always does (its deadlock rule is
untouched: the store still happens in that OPEN, on the trio thread).  Without the inline path
(``accel=-inline``) every OPEN starts the read of the file listed after it.

Measured (bench_fuse "readall", 3 runs, ratio to the kernel, with -> without): lz4hc 0.72 -> 0.69,
zstd 0.78 -> 0.73.  Started for every file instead (before storeahead tried it inline), it doubled
the work and fought the trio thread for the GIL: zstd 0.37 instead of 0.71.

Bounds: at most ``SLOTS`` results are kept (the oldest dropped: a walker that went elsewhere wastes
one read per OPEN, never memory), each at most ``pagestore.STORE_MAX`` bytes; a read that fails is
dropped and the OPEN reads again, reporting the error as without this.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import trio

log = logging.getLogger(__name__)

SLOTS = 4


class _Slot:
    __slots__ = ("done", "data")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.data: bytes | None = None


class ReadNext:
    """Worker-thread reads of the files a walk is expected to open next, and their hand-over."""

    def __init__(self, read, slots: int = SLOTS) -> None:
        self._read = read                 # async (ino, size) -> bytes: the OPEN's own read
        self._slots: OrderedDict[int, _Slot] = OrderedDict()
        self._max = slots
        self.nursery: trio.Nursery | None = None     # set by the lifecycle once the session runs
        self.started = self.taken = 0

    def start(self, ino: int, size: int) -> None:
        """Begin reading ``ino`` (``size`` bytes) in the background, unless it is under way."""
        if self.nursery is None or ino in self._slots:
            return
        while len(self._slots) >= self._max:
            self._slots.popitem(last=False)
        slot = self._slots[ino] = _Slot()
        self.started += 1
        self.nursery.start_soon(self._run, ino, size, slot)

    async def _run(self, ino: int, size: int, slot: _Slot) -> None:
        try:
            data = await self._read(ino, size)
            slot.data = data if len(data) == size else None
        except Exception as exc:  # noqa: BLE001 - a guess only: the OPEN reads again and reports it
            log.debug("read-next of inode %d: %s", ino, exc)
        finally:
            slot.done.set()

    async def take(self, ino: int) -> bytes | None:
        """The bytes read ahead for ``ino`` (waiting for a read under way), or None."""
        slot = self._slots.pop(ino, None)
        if slot is None:
            return None
        await slot.done.wait()
        if slot.data is not None:
            self.taken += 1
        return slot.data
