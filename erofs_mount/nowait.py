"""Calls that must not wait: the thread-local "nowait" mode of the FUSE daemon's inline path.

The FUSE daemon first runs a reader call on its trio thread inside ``nowait()``
(backends/fuse/accel/inline.py): a source read that would wait for the disk or the network raises
``WouldBlock`` instead, and the call is redone in a worker thread.  A lock is a wait too: one held
by a worker thread that is itself waiting for the trio loop (a registry read through the bridge)
would never be released while the trio thread waits for it.  ``hold(lock)`` takes a lock the
reader keeps across reads: at once, or ``WouldBlock`` in nowait mode.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

_state = threading.local()


class WouldBlock(Exception):
    """An inline read would have waited: redo the call in a worker thread."""


@contextmanager
def nowait():
    _state.on = True
    try:
        yield
    finally:
        _state.on = False


def call_nowait(fn, *args):
    """``fn(*args)`` inside ``nowait()`` (the same, without a context manager's cost per request)."""
    state = _state
    state.on = True
    try:
        return fn(*args)
    finally:
        state.on = False


def nowait_active() -> bool:
    return getattr(_state, "on", False)


@contextmanager
def hold(lock):
    """``with lock:``, except that in nowait mode a lock another thread holds raises WouldBlock."""
    if getattr(_state, "on", False):
        if not lock.acquire(blocking=False):
            raise WouldBlock
    else:
        lock.acquire()
    try:
        yield
    finally:
        lock.release()
