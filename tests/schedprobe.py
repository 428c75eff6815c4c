"""Does an await pass through trio's scheduler?  (Shared by test_busypoll.py and test_shim.py.)"""

import trio


def other_task_ran(step, times: int) -> bool:
    """Await ``step()`` ``times`` times in a trio run with another task started just before:
    whether that task ran meanwhile, i.e. whether the awaits passed through the scheduler.
    Two passes are always enough for it to run (it runs in the first batch after a pass)."""
    ran: list[int] = []
    seen: list[bool] = []

    async def other():
        ran.append(1)

    async def main():
        async with trio.open_nursery() as n:
            n.start_soon(other)
            for _ in range(times):
                await step()
            seen.append(bool(ran))

    trio.run(main)
    return seen[0]
