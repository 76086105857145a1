"""The event loops the mesh runs on: uvloop (libuv, fewer microseconds per wake-up) by default.

Used by the peer (`Peer.run`, training peers too), the trainer CLI and the client's background
loop. Set SWARM_MESH_EVENT_LOOP to uvloop or asyncio to choose (to compare, or to debug).
Training ran on asyncio for a while: a lock-step run on uvloop had drifted from single-process
training (loss gap 0.0037 against 0.002, twice). Two lock-step races found since would do that
(a partner read a mid-round record as short of the batch; a round stepped on part of a batch),
and with both fixed the training scenarios pass on uvloop (9 of 9 under a CPU burner).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from swarm.threads import serial_executor

logger = logging.getLogger(__name__)

T = TypeVar("T")


def _use_uvloop(default: str = "uvloop") -> bool:
    choice = os.environ.get("SWARM_MESH_EVENT_LOOP", default)
    if choice not in ("uvloop", "asyncio"):
        raise ValueError(f"SWARM_MESH_EVENT_LOOP must be uvloop or asyncio, got {choice!r}")
    return choice == "uvloop"


def new_event_loop(default: str = "uvloop") -> asyncio.AbstractEventLoop:
    """A new loop whose `asyncio.to_thread` runs torch serially (swarm.threads says why)."""
    if _use_uvloop(default):
        import uvloop

        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    loop.set_default_executor(serial_executor())
    return loop


def run(main: Coroutine[Any, Any, T], default: str = "uvloop") -> T:
    """asyncio.run on the chosen loop: `default` ("uvloop" or "asyncio") unless the env says."""
    if hasattr(asyncio, "Runner"):  # Python 3.11+
        with asyncio.Runner(loop_factory=lambda: new_event_loop(default)) as runner:
            return runner.run(main)
    loop = new_event_loop(default)
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(main)
    finally:
        asyncio.set_event_loop(None)
        loop.close()


def quiet(what: str) -> Callable[[asyncio.Future], None]:
    """A done-callback for a background task nobody awaits: its failure is logged at DEBUG (as
    `what`), not as "Task exception was never retrieved"."""

    def done(task: asyncio.Future) -> None:
        if not task.cancelled() and task.exception() is not None:
            logger.debug("%s failed: %r", what, task.exception())

    return done


async def within(aw: Awaitable[T], timeout: float | None) -> T:
    """`await aw`, raising TimeoutError after `timeout` seconds: asyncio.wait_for, less a bug.

    Python 3.11's wait_for drops a cancellation that arrives as the awaited call completes: it
    returns the result and the cancelled task runs on. An announcer cancelled that way kept
    refreshing its records (tests/peer/test_announcer.py saw them live 22 s after the cancel).
    asyncio.timeout counts cancellations and never loses one.
    """
    async with asyncio.timeout(timeout):
        return await aw
