"""Sync access to a source from a trio worker thread.

The pure EROFS reader is synchronous and runs under ``trio.to_thread.run_sync``
(FUSE backend); it reads through ``SyncReadAt.read_at``.  For a source with a
sync ``pread`` (LocalSource) that is a direct positional read in the calling
thread, and so is a read that a registry blob's persistent cache holds whole
(``pread_cached``); otherwise the async ``read_at`` is run on the trio loop with
``trio.from_thread.run`` (so it may only be called from a thread started by
trio, or with the loop's ``trio_token``, and never from the loop thread itself).
"""

from __future__ import annotations

import trio


class SyncReadAt:
    def __init__(self, source, trio_token: trio.lowlevel.TrioToken | None = None) -> None:
        self.source = source
        self.size: int = source.size
        self._token = trio_token
        self._pread = getattr(source, "pread", None)
        self._cached = getattr(source, "pread_cached", None)   # sync reads of what is on disk already

    @classmethod
    def here(cls, source) -> "SyncReadAt":
        """Bridge bound to the current trio run (call from inside trio)."""
        return cls(source, trio.lowlevel.current_trio_token())

    def read_at(self, offset: int, length: int) -> bytes:
        if self._pread is not None:
            return self._pread(offset, length)
        if self._cached is not None:
            data = self._cached(offset, length)
            if data is not None:
                return data
        return trio.from_thread.run(self.source.read_at, offset, length, trio_token=self._token)

    def __repr__(self) -> str:
        return f"SyncReadAt({self.source!r})"
