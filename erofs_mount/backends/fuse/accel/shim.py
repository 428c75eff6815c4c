"""What pyfuse3 sees as ``trio``: trio itself, with a cheaper lock and wait on its request loop.

pyfuse3 reaches trio through its module attribute ``pyfuse3.trio`` (its own asyncio mode swaps
that attribute the same way, ``pyfuse3/asyncio.py``).  Its request loop (``_session_loop`` and
``_wait_fuse_readable`` in pyfuse3's ``internal.pxi``) takes ``trio.Lock()`` around waiting for
and reading each request.  trio's ``Lock`` is fair: ``acquire`` always passes through the
scheduler, and ``release`` hands the lock to a parked task.  So every request paid for a full
scheduler pass (an ``epoll_wait``, task switches), ~8 µs on this VM, and with a second worker
task parked on the lock, for a switch to it as well.

``BargingLock`` is taken at once when free, and a release only wakes a waiter, which takes the
lock if it is still free when it runs.  pyfuse3's workers are interchangeable, so fairness
between them buys nothing.  Measured on the 60,000-path images of bench/bench_fuse.py, runs
alternating with trio's lock: reading every file took 11.8-12.9 s with trio's lock and
9.5-10.2 s with this one (lz4hc), 11.6-13.3 s and 8.5-9.5 s (uncompressed); the lstat walk
3.0-3.3 s and 2.7-3.0 s (lz4hc).
With a busy-polling ``Poller`` in front (busypoll.py), a stream of requests then runs without
any scheduler pass; the poller still yields every ``busypoll.YIELD_EVERY`` seconds so that
other tasks keep running.
"""

from __future__ import annotations

import trio


class BargingLock:
    """A mutex for trio tasks: an uncontended acquire is not a checkpoint; no FIFO hand-off."""

    def __init__(self) -> None:
        self._held = False
        self._lot = trio.lowlevel.ParkingLot()

    def locked(self) -> bool:
        return self._held

    async def acquire(self) -> None:
        while self._held:
            await self._lot.park()
        self._held = True

    def release(self) -> None:
        if not self._held:
            raise RuntimeError("release of an unlocked BargingLock")
        self._held = False
        if self._lot:
            self._lot.unpark()

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc) -> None:
        self.release()


class _Lowlevel:
    def __init__(self, wait_readable) -> None:
        self.wait_readable = wait_readable

    def __getattr__(self, name: str):
        return getattr(trio.lowlevel, name)


class _Trio:
    """trio, except ``Lock`` and (with a poller) ``lowlevel.wait_readable``."""

    Lock = BargingLock

    def __init__(self, poller) -> None:
        self.lowlevel = _Lowlevel(poller.wait_readable) if poller is not None else trio.lowlevel

    def __getattr__(self, name: str):
        return getattr(trio, name)


def install(poller=None) -> bool:
    """Put the proxy where pyfuse3 looks for trio; False when this pyfuse3 does not look there."""
    import pyfuse3

    if getattr(pyfuse3, "trio", None) is not trio:
        return False
    pyfuse3.trio = _Trio(poller)
    return True


def uninstall() -> None:
    import pyfuse3

    if isinstance(getattr(pyfuse3, "trio", None), _Trio):
        pyfuse3.trio = trio
