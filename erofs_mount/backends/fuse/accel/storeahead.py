"""Store-ahead: the next small file of a directory goes into the page cache before its OPEN.

Programs that read a tree (tar, cp -r, rsync, checksum and virus scans, a container's first
start) open the files of a directory in the order readdir listed them.  pagestore.py stores a
small file when it is opened, so each OPEN waits while the daemon decodes the file and hands it
to the kernel.  Between answering that OPEN and the walker's next request (it reads the stored
pages, closes the file, takes the next entry) the daemon has nothing to do: with busy polling
it spins.  So opening a file marks the regular file listed after it, and the poller, before it
waits for the next request, stores that file (``Poller.idle``; without busy polling, i.e. on one
CPU or with ``poll_us=0``, nothing is stored ahead).  The OPEN that follows finds it
stored and is answered at once.  Reading every file of a 60,000-file lz4hc tree
(bench/bench_fuse.py) then waits for ~48,000 fewer decodes.

Only what a walk in listing order opens next is stored, and only under pagestore.py's rules
(small, not yet stored, no handle open: the deadlock rule holds because the check and the store
are one step on the trio thread).  The bytes must be at hand: the read runs inline
(``inline.call_nowait``) and is dropped if it would wait for the disk or the network, so no
thread hop or registry fetch is ever made for a guess.  Waste is bounded by one file of at most
``pagestore.STORE_MAX`` bytes per OPEN, stored in otherwise idle time.

Pure bookkeeping: ``dirops.py`` feeds the listing order, ``ops.py`` the OPENs and the store.
"""

from __future__ import annotations

from collections.abc import Callable

LIMIT = 65536      # listed files (and directories) remembered; forgotten all at once beyond that


class StoreAhead:
    """The listing order of regular files and the one store it suggests next."""

    def __init__(self, store: Callable[[int, int], None], limit: int = LIMIT) -> None:
        self._store = store                            # (ino, size): store that file if still wanted
        self._limit = limit
        self._next: dict[int, tuple[int, int]] = {}    # ino -> (ino, size) of the next regular file listed
        self._last: dict[int, tuple[int, int]] = {}    # directory -> the last regular file listed in it
        self.pending: tuple[int, int] | None = None    # the file to store when idle

    def listing_starts(self, directory: int) -> None:
        """A listing of ``directory`` starts from its first entry (a new walk or a rewinddir)."""
        self._last.pop(directory, None)

    def listed(self, directory: int, ino: int, size: int) -> None:
        """readdir handed out ``ino`` (``size`` bytes) as the next file of ``directory`` that the page
        store takes (a regular file of 1 to ``STORE_MAX`` bytes; the files between are not listed
        here: opening them suggests nothing, and the one before them suggests the one after)."""
        last = self._last
        prev = last.get(directory)
        if prev is not None:
            nxt = self._next
            if len(nxt) >= self._limit:
                nxt.clear()
            nxt[prev[0]] = (ino, size)
        elif len(last) >= self._limit:
            last.clear()
        last[directory] = (ino, size)

    def opened(self, ino: int) -> None:
        """``ino`` was opened: the file listed after it is the one to store next."""
        self.pending = self._next.get(ino)

    def next_of(self, ino: int) -> tuple[int, int] | None:
        """(ino, size) of the file listed after ``ino`` (readnext.py reads it ahead), or None."""
        return self._next.get(ino)

    def run(self) -> None:
        """Store the pending file (called when the daemon has nothing else to do)."""
        p = self.pending
        if p is not None:
            self.pending = None
            self._store(*p)
