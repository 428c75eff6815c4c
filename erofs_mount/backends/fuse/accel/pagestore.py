"""Small files go into the kernel's page cache when they are opened (``FUSE_NOTIFY_STORE``).

Opening and reading a small file costs two round trips through the daemon: OPEN, then the READ
of the kernel's readahead, each waiting for the daemon's answer and waking the reader.  Instead,
``open`` reads the whole file (up to ``STORE_MAX`` bytes) and hands it to the kernel with
``pyfuse3.notify_store`` before it answers the OPEN, and the OPEN keeps the cache
(``keep_cache``): the reader's ``read()`` then finds every page up to date and sends no READ.
The kernel stores whole pages and marks them up to date, the last one zero-filled past the end of
the file (``fuse_notify_store``, ``fs/fuse/dev.c``).  Reading every file of a 60,000-file tree
(bench/bench_fuse.py) sends ~50,000 fewer requests.

Deadlock rule.  ``fuse_notify_store`` locks the file's page-cache folios one by one, and runs in
the daemon's ``writev``, on the trio thread.  A readahead holds those folio locks while its READ
waits for an answer from that same thread: a store into a file with a READ in flight would
never return.  READs travel only on open handles (an asynchronous readahead READ holds a
reference to its handle, so the handle's RELEASE comes after the READ's answer).  So a file is
stored only while none of its handles is open, i.e. no OPEN answered and not yet released; the
check and the store are one synchronous step on the trio thread, with no await between them.

Wasted work is bounded: a file is stored once (the kernel keeps its pages; if it drops them,
READ serves the file as before), only up to ``STORE_MAX`` bytes, and a read that fails is left
for ``read()`` to report with its errno.

storeahead.py stores the next file of a walk under the same rules before its OPEN comes.
"""

from __future__ import annotations

import errno
import logging
from collections import OrderedDict

import pyfuse3

log = logging.getLogger(__name__)

STORE_MAX = 128 * 1024     # bytes: larger files are read by the kernel's readahead as before
REMEMBER = 16384           # stored inodes remembered (not stored again while remembered)


class PageStore:
    """Open-handle counts per inode and the stores they allow."""

    def __init__(self, max_size: int = STORE_MAX, notify=None) -> None:
        self._notify = notify if notify is not None else pyfuse3.notify_store   # (ino, offset, data)
        self.max_size = max_size
        self.enabled = max_size > 0
        self._open: dict[int, int] = {}        # ino -> handles opened (OPEN answered) and not released
        # ino -> stored, oldest first.  An OrderedDict: dropping a plain dict's first key again and
        # again leaves holes that every next(iter()) scans (3.3 us a store at 16,384, here 0.3)
        self._stored: OrderedDict[int, None] = OrderedDict()
        self.stores = 0
        self.store_bytes = 0

    def wants(self, ino: int, size: int) -> bool:
        """Whether ``open`` should read ``ino`` (``size`` bytes) for a store."""
        return self.enabled and 0 < size <= self.max_size and ino not in self._stored \
            and not self._open.get(ino)

    def store(self, ino: int, data: bytes) -> bool:
        """Hand ``data`` (the whole file) to the kernel, if no handle of ``ino`` is open.  Call with
        no await between this and answering the OPEN."""
        if not self.enabled or self._open.get(ino):
            return False
        try:
            self._notify(ino, 0, data)
        except OSError as exc:
            if exc.errno == errno.ENOSYS:
                log.info("the kernel does not take FUSE_NOTIFY_STORE: files are read on demand")
                self.enabled = False
            else:
                log.debug("notify_store of inode %d: %s", ino, exc)
            return False
        stored = self._stored
        stored[ino] = None
        if len(stored) > REMEMBER:
            stored.popitem(last=False)
        self.stores += 1
        self.store_bytes += len(data)
        return True

    def opened(self, ino: int) -> None:
        self._open[ino] = self._open.get(ino, 0) + 1

    def released(self, ino: int) -> None:
        left = self._open.get(ino, 0) - 1
        if left > 0:
            self._open[ino] = left
        else:
            self._open.pop(ino, None)
