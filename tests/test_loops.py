"""swarm/loops.py: the event loop choice, and `within`, the timeout that keeps cancellations."""

from __future__ import annotations

import asyncio
import sys

import pytest

from swarm import loops

pytestmark = pytest.mark.timeout(30)


async def _cancel_as_it_completes(wait) -> asyncio.Task:
    """A task awaiting `wait(future, 10)`, cancelled in the same loop turn the future completes."""
    future = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(wait(future, 10.0))
    await asyncio.sleep(0)  # the task now waits on the future
    future.set_result("stored")
    task.cancel()
    return task


@pytest.mark.parametrize("event_loop", ["asyncio", "uvloop"])
def test_within_keeps_a_cancellation_that_races_the_result(event_loop):
    async def main():
        task = await _cancel_as_it_completes(loops.within)
        with pytest.raises(asyncio.CancelledError):
            await task
        if sys.version_info < (3, 12):
            # The race is real: 3.11's wait_for returns the result and the task runs on.
            assert await (await _cancel_as_it_completes(asyncio.wait_for)) == "stored"

    loops.run(main(), default=event_loop)


def test_within_times_out_and_cancels_what_it_awaited():
    async def main():
        cancelled = asyncio.Event()

        async def slow():
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.set()
                raise

        with pytest.raises(TimeoutError):
            await loops.within(slow(), 0.05)
        assert cancelled.is_set()
        assert await loops.within(asyncio.sleep(0, "done"), None) == "done"

    loops.run(main(), default="asyncio")
