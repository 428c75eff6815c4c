"""The adaptive polling window in front of pyfuse3's waits (backends/fuse/accel/busypoll.py), on real pipes."""

import os

import pytest
import trio

from erofs_mount.backends.fuse.accel import busypoll
from erofs_mount.backends.fuse.config import DEFAULT_POLL_US, FuseOptions
from erofs_mount.errors import UsageError
from tests.schedprobe import other_task_ran


@pytest.fixture
def pipe():
    r, w = os.pipe()
    yield r, w
    os.close(r)
    os.close(w)


async def _wait_for_late_write(p, r, w, delay=0.05):
    """``p.wait_readable(r)`` while the data arrives ``delay`` seconds later."""
    async with trio.open_nursery() as n:
        async def later():
            await trio.sleep(delay)
            os.write(w, b"x")
        n.start_soon(later)
        with trio.fail_after(5):
            await p.wait_readable(r)


def test_ready_fd_is_found_while_polling(pipe):
    r, w = pipe
    p = busypoll.Poller(1000)

    async def main():
        os.write(w, b"x")
        with trio.fail_after(5):
            await p.wait_readable(r)

    trio.run(main)
    assert (p.hits, p.sleeps) == (1, 0)


def test_idle_fd_backs_off_exponentially(pipe):
    r, w = pipe
    p = busypoll.Poller(20)

    async def main():
        # data arrives 50 ms after each wait starts: every poll misses, then the wait sleeps
        for _ in range(4):
            await _wait_for_late_write(p, r, w)
            os.read(r, 1)

    trio.run(main)
    # wait 1 polls and misses (skip 1), wait 2 skips, wait 3 polls and misses (skip 2), wait 4 skips
    assert p.hits == 0 and p.sleeps == 4
    assert p._backoff == 2 and p._skip == 1


def test_backoff_is_capped_and_reset_by_a_quick_request(pipe):
    r, w = pipe
    p = busypoll.Poller(50_000)            # 50 ms window: a 0-delay write counts as "soon"
    p._backoff, p._skip = busypoll.MAX_BACKOFF, 5

    async def main():
        async with trio.open_nursery() as n:
            n.start_soon(trio.to_thread.run_sync, os.write, w, b"x")
            with trio.fail_after(5):
                await p.wait_readable(r)    # skipped polling, slept, woke quickly
        os.read(r, 1)

    trio.run(main)
    assert p.sleeps == 1 and p._backoff == 0 and p._skip == 0
    q = busypoll.Poller(10)
    for _ in range(20):
        q._backoff = min(busypoll.MAX_BACKOFF, max(1, 2 * q._backoff))
    assert q._backoff == busypoll.MAX_BACKOFF


def test_found_requests_still_yield_to_other_tasks_every_yield_every(pipe):
    r, w = pipe
    os.write(w, b"x")                       # never read: every wait finds the fd ready
    p = busypoll.Poller(1000)
    p.yield_every = 1e9
    assert not other_task_ran(lambda: p.wait_readable(r), 50)    # no pass through the scheduler
    p.yield_every = 0
    assert other_task_ran(lambda: p.wait_readable(r), 2)
    assert p.hits == 52 and p.sleeps == 0


def test_make_is_off_for_zero_window_and_one_cpu(monkeypatch):
    assert busypoll.make(0) is None
    monkeypatch.setattr(busypoll, "usable_cpus", lambda: 2)
    assert isinstance(busypoll.make(50), busypoll.Poller)
    monkeypatch.setattr(busypoll, "usable_cpus", lambda: 1)
    assert busypoll.make(50) is None


def test_poll_us_option_is_bounded():
    assert FuseOptions.from_strings([], {"poll_us": "0"}).poll_us == 0
    assert FuseOptions().poll_us == DEFAULT_POLL_US
    with pytest.raises(UsageError, match="poll_us=20000"):
        FuseOptions.from_strings([], {"poll_us": "20000"}).libfuse_options("img", is_root=True)


class _Idle:
    def __init__(self):
        self.pending = None
        self.runs = 0

    def run(self):
        self.pending = None
        self.runs += 1


def test_idle_work_runs_only_when_no_request_waits(pipe):
    r, w = pipe
    p = busypoll.Poller(1000)
    p.idle = idle = _Idle()

    async def main():
        idle.pending = 1
        os.write(w, b"x")             # a request is waiting: it comes first, the work stays pending
        with trio.fail_after(5):
            await p.wait_readable(r)
        assert (idle.runs, idle.pending) == (0, 1)
        os.read(r, 1)
        await _wait_for_late_write(p, r, w)   # nothing waiting: the work runs, then the wait goes on
        assert (idle.runs, idle.pending) == (1, None)
        os.read(r, 1)
        os.write(w, b"x")
        with trio.fail_after(5):
            await p.wait_readable(r)  # nothing pending: nothing runs
        assert idle.runs == 1

    trio.run(main)


def test_failing_idle_work_is_turned_off_and_the_wait_goes_on(pipe):
    r, w = pipe
    p = busypoll.Poller(1000)

    class Broken(_Idle):
        def run(self):
            raise RuntimeError("bug")

    p.idle = Broken()
    p.idle.pending = 1

    trio.run(_wait_for_late_write, p, r, w, 0.02)
    assert p.idle is None
