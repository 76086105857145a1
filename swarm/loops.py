"""The event loops the mesh runs on: uvloop (libuv, fewer microseconds per wake-up) by default.

Used by the peer (`Peer.run`), the trainer CLI and the client's background loop. Set
SWARM_MESH_EVENT_LOOP=asyncio to run on the standard loop (to compare, or to debug).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def _use_uvloop() -> bool:
    choice = os.environ.get("SWARM_MESH_EVENT_LOOP", "uvloop")
    if choice not in ("uvloop", "asyncio"):
        raise ValueError(f"SWARM_MESH_EVENT_LOOP must be uvloop or asyncio, got {choice!r}")
    return choice == "uvloop"


def new_event_loop() -> asyncio.AbstractEventLoop:
    if _use_uvloop():
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def run(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run on the chosen loop."""
    if hasattr(asyncio, "Runner"):  # Python 3.11+
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            return runner.run(main)
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(main)
    finally:
        asyncio.set_event_loop(None)
        loop.close()
