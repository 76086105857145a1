"""One asyncio event loop in a background thread, owned by a client model object.

Used by DistributedModelForCausalLM so that its sync API drives the async RPC client; the P2P
handle lives and dies with this loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from swarm import loops
from swarm.threads import serial_torch

logger = logging.getLogger(__name__)

T = TypeVar("T")


class BackgroundLoop:
    """Runs coroutines on a private event loop in a daemon thread.

    name: the thread's name, for debugging.
    """

    def __init__(self, name: str = "swarm-client-loop"):
        self._loop = loops.new_event_loop()  # uvloop unless SWARM_MESH_EVENT_LOOP=asyncio
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()
        self._ready.wait()
        self._closed = False

    def _main(self) -> None:
        serial_torch()  # the caller's thread computes; this one decodes and waits
        asyncio.set_event_loop(self._loop)
        self._loop.call_soon(self._ready.set)
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def in_loop_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run `coro` on the loop and wait for its result (re-raising its exception).

        timeout: seconds to wait; on expiry the coroutine is cancelled and TimeoutError raised.
        """
        if self._closed:
            coro.close()
            raise RuntimeError("the client's event loop is closed")
        if self.in_loop_thread():
            coro.close()
            raise RuntimeError("BackgroundLoop.run called from its own thread would deadlock")
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise TimeoutError(f"operation did not finish in {timeout} s") from None
        except BaseException:
            # KeyboardInterrupt in the caller: stop the work it was waiting on.
            fut.cancel()
            raise

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule `coro` without waiting for it."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def close(self, timeout: float = 5.0) -> None:
        """Cancel what still runs on the loop, stop it and join the thread."""
        if self._closed:
            return
        self._closed = True

        async def _cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if self._loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(_cancel_all(), self._loop).result(timeout)
            except Exception as e:  # a task that refuses to die must not block shutdown
                logger.debug("cancelling client tasks: %r", e)
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
