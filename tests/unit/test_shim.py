"""What pyfuse3 sees as trio (backends/fuse/accel/shim.py): the barging lock and the install/uninstall."""

import pytest
import trio

from erofs_mount.backends.fuse.accel import busypoll, shim
from tests.schedprobe import other_task_ran


def test_uncontended_acquire_is_not_a_checkpoint():
    def acquire_release(lock):
        async def step():
            async with lock:
                assert lock.locked()
            assert not lock.locked()
        return step

    assert not other_task_ran(acquire_release(shim.BargingLock()), 100)
    assert other_task_ran(acquire_release(trio.Lock()), 2)     # trio's passes through the scheduler


def test_mutual_exclusion_and_every_waiter_gets_the_lock():
    lock = shim.BargingLock()
    inside = 0
    done = []

    async def worker(k):
        nonlocal inside
        for _ in range(50):
            async with lock:
                inside += 1
                assert inside == 1
                await trio.sleep(0)          # hold it across a switch: others park
                inside -= 1
            await trio.sleep(0)              # let a woken waiter barge in
        done.append(k)

    async def main():
        with trio.fail_after(10):
            async with trio.open_nursery() as n:
                for k in range(20):
                    n.start_soon(worker, k)

    trio.run(main)
    assert sorted(done) == list(range(20))


def test_a_cancelled_waiter_leaves_the_lock_usable():
    lock = shim.BargingLock()

    async def main():
        await lock.acquire()
        with trio.move_on_after(0.01):
            await lock.acquire()             # parks, then is cancelled
        lock.release()
        with trio.fail_after(5):
            async with lock:
                pass

    trio.run(main)
    with pytest.raises(RuntimeError, match="unlocked"):
        lock.release()


def test_install_routes_pyfuse3_and_uninstall_restores():
    pyfuse3 = pytest.importorskip("pyfuse3")
    poller = busypoll.Poller(50)
    assert shim.install(poller)
    try:
        assert pyfuse3.trio.lowlevel.wait_readable == poller.wait_readable
        assert pyfuse3.trio.Lock is shim.BargingLock
        assert pyfuse3.trio.lowlevel.current_task is trio.lowlevel.current_task   # the rest is trio's
        assert pyfuse3.trio.open_nursery is trio.open_nursery
        assert not shim.install(poller)      # already installed: pyfuse3.trio is not trio
    finally:
        shim.uninstall()
    assert pyfuse3.trio is trio
    assert shim.install(None)                # no poller: trio's own wait, the barging lock
    try:
        assert pyfuse3.trio.lowlevel.wait_readable is trio.lowlevel.wait_readable
        assert pyfuse3.trio.Lock is shim.BargingLock
    finally:
        shim.uninstall()
    assert pyfuse3.trio is trio
