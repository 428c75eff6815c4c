"""Adaptive busy polling of the FUSE device: answer the next request without a sleep/wake-up.

A FUSE request is a round trip between two processes: the reader's syscall queues it, the
daemon wakes, answers, and the reader wakes.  For small requests the wake-ups dominate (on a
2-vCPU VM an idle vCPU halts and needs an interrupt to run again: ~80 µs for OPEN+RELEASE with
a do-nothing pyfuse3 file system, 63 µs with squashfuse).  A reader walking a tree sends its
next request a few microseconds after our answer, so the daemon polls the device for a short
window (``poll_us``, default 50 µs) before it goes to sleep in the event loop: the same
do-nothing file system then answers OPEN+RELEASE in ~50 µs, and reading every file of a
60,000-file tree takes a third less time (see bench/bench_fuse.py).

The window adapts: a poll that finds nothing backs off exponentially (1, 2, 4 ... 256 waits go
straight to sleep), and any request that arrives soon after the daemon went to sleep (within
two windows) turns polling back on.  An idle mount therefore costs one window after its last
request, and a mount serving a slow trickle of requests does not spin at all.  With a single
CPU polling would only take time from the reader, so it is off there.

pyfuse3 reaches trio through its module attribute ``pyfuse3.trio`` (its own asyncio mode swaps
that attribute the same way, ``pyfuse3/asyncio.py``); ``install()`` puts a proxy there whose
``lowlevel.wait_readable`` polls first and otherwise is trio itself.
"""

from __future__ import annotations

import logging
import os
import select
import time

import trio

log = logging.getLogger(__name__)

from .config import DEFAULT_POLL_US  # noqa: F401 - re-exported: the figure's explanation is here

MAX_BACKOFF = 256        # waits that go straight to sleep after repeated misses


class Poller:
    """``wait_readable`` with an adaptive polling window in front of trio's."""

    def __init__(self, window_us: int) -> None:
        self.window = window_us / 1e6
        self.hits = 0          # requests found while polling
        self.sleeps = 0        # waits that went to sleep in the event loop
        self._polls: dict[int, select.poll] = {}
        self._backoff = 0
        self._skip = 0

    def _poll_for(self, fd: int) -> bool:
        p = self._polls.get(fd)
        if p is None:
            p = self._polls[fd] = select.poll()
            p.register(fd, select.POLLIN)
        deadline = time.perf_counter() + self.window
        while True:
            if p.poll(0):   # releases the GIL: worker threads keep running
                return True
            if time.perf_counter() >= deadline:
                return False

    async def wait_readable(self, fd: int) -> None:
        if self._skip:
            self._skip -= 1
        elif self._poll_for(fd):
            self.hits += 1
            self._backoff = 0
            return
        else:
            self._backoff = min(MAX_BACKOFF, max(1, 2 * self._backoff))
            self._skip = self._backoff
        self.sleeps += 1
        start = time.perf_counter()
        await trio.lowlevel.wait_readable(fd)
        if time.perf_counter() - start < 2 * self.window:
            self._backoff = self._skip = 0   # requests come close together again: poll

    def stats(self) -> dict:
        return {"poll_hits": self.hits, "poll_sleeps": self.sleeps}


class _Lowlevel:
    def __init__(self, poller: Poller) -> None:
        self.wait_readable = poller.wait_readable

    def __getattr__(self, name: str):
        return getattr(trio.lowlevel, name)


class _Trio:
    """What pyfuse3 sees as ``trio``: trio, except ``lowlevel.wait_readable``."""

    def __init__(self, poller: Poller) -> None:
        self.lowlevel = _Lowlevel(poller)

    def __getattr__(self, name: str):
        return getattr(trio, name)


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def install(window_us: int) -> Poller | None:
    """Route pyfuse3's waits on /dev/fuse through a ``Poller``; None when polling is off."""
    import pyfuse3

    if window_us <= 0:
        return None
    if usable_cpus() < 2:
        log.info("busy polling off: one CPU (it would only delay the reader)")
        return None
    if getattr(pyfuse3, "trio", None) is not trio:
        log.warning("busy polling off: this pyfuse3 does not reach trio through pyfuse3.trio")
        return None
    poller = Poller(window_us)
    pyfuse3.trio = _Trio(poller)
    return poller


def uninstall() -> None:
    import pyfuse3

    if isinstance(getattr(pyfuse3, "trio", None), _Trio):
        pyfuse3.trio = trio
