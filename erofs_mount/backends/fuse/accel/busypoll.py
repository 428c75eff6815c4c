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

A request found while polling returns without a pass through trio's scheduler (with
``shim.BargingLock`` in front, a stream of requests is served without any).  Other tasks -- a
reply from a worker thread, the signal handler, the status publisher -- only run at such a
pass, so a found request still yields once ``YIELD_EVERY`` seconds have gone by since the last
one: a flood of requests delays them by at most that much.  ``shim.install`` puts
``wait_readable`` where pyfuse3 calls it.

Idle work.  The gap between answering a request and the next one is the daemon's only idle
time; ``Poller.idle`` (storeahead.py: store the file a walker opens next) runs in it, once per
wait and only when no request is waiting, so a request never waits behind more than one item.
"""

from __future__ import annotations

import logging
import os
import select
import time

import trio

log = logging.getLogger(__name__)

MAX_BACKOFF = 256        # waits that go straight to sleep after repeated misses
YIELD_EVERY = 0.002      # seconds of found requests after which one still passes through trio


class Poller:
    """``wait_readable`` with an adaptive polling window in front of trio's."""

    def __init__(self, window_us: int) -> None:
        self.window = window_us / 1e6
        self.hits = 0          # requests found while polling
        self.sleeps = 0        # waits that went to sleep in the event loop
        self._polls: dict[int, select.poll] = {}
        self._backoff = 0
        self._skip = 0
        self.yield_every = YIELD_EVERY
        self._yielded = time.perf_counter()   # the last pass through trio's scheduler
        self.idle = None       # work for the gap before the next request: ``pending``, ``run()``

    def _poll_of(self, fd: int) -> select.poll:
        p = self._polls.get(fd)
        if p is None:
            p = self._polls[fd] = select.poll()
            p.register(fd, select.POLLIN)
        return p

    def _poll_for(self, fd: int) -> bool:
        p = self._poll_of(fd)
        deadline = time.perf_counter() + self.window
        while True:
            if p.poll(0):   # releases the GIL: worker threads keep running
                return True
            if time.perf_counter() >= deadline:
                return False

    async def wait_readable(self, fd: int) -> None:
        idle = self.idle
        if idle is not None and idle.pending is not None and not self._poll_of(fd).poll(0):
            try:
                idle.run()
            except Exception:  # noqa: BLE001 - a bug in optional work must not end the request loop
                log.exception("idle work failed; it is off from now on")
                self.idle = None
        if self._skip:
            self._skip -= 1
        elif self._poll_for(fd):
            self.hits += 1
            self._backoff = 0
            now = time.perf_counter()
            if now - self._yielded >= self.yield_every:
                self._yielded = now
                await trio.lowlevel.checkpoint()
            return
        else:
            self._backoff = min(MAX_BACKOFF, max(1, 2 * self._backoff))
            self._skip = self._backoff
        self.sleeps += 1
        start = time.perf_counter()
        await trio.lowlevel.wait_readable(fd)
        self._yielded = now = time.perf_counter()
        if now - start < 2 * self.window:
            self._backoff = self._skip = 0   # requests come close together again: poll


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def make(window_us: int) -> Poller | None:
    """A ``Poller`` for this machine, or None when polling is off (window 0, or one CPU)."""
    if window_us <= 0:
        return None
    if usable_cpus() < 2:
        log.info("busy polling off: one CPU (it would only delay the reader)")
        return None
    return Poller(window_us)
