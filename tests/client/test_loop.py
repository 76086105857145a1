"""Tests of petals_like.loop: the background event loop behind the sync API."""

import asyncio
import threading

import pytest

from petals_like.loop import BackgroundLoop


@pytest.mark.timeout(10)
def test_runs_coroutines_and_reraises():
    loop = BackgroundLoop()
    try:

        async def where():
            return threading.current_thread().name

        assert loop.run(where()) == "swarm-client-loop"

        async def boom():
            raise KeyError("x")

        with pytest.raises(KeyError):
            loop.run(boom())
    finally:
        loop.close()


@pytest.mark.timeout(10)
def test_timeout_cancels_the_coroutine():
    loop = BackgroundLoop()
    cancelled = threading.Event()
    try:

        async def slow():
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.set()
                raise

        with pytest.raises(TimeoutError):
            loop.run(slow(), timeout=0.1)
        assert cancelled.wait(2)
    finally:
        loop.close()


@pytest.mark.timeout(10)
def test_close_cancels_background_tasks_and_refuses_new_work():
    loop = BackgroundLoop()
    loop.submit(asyncio.sleep(30))
    loop.close()
    coro = asyncio.sleep(0)
    with pytest.raises(RuntimeError):
        loop.run(coro)
