"""Waiting on a peer's request while probing that it still lives; errors that mean it is lost.

Used by the client's router (SwarmRouter.guarded) for every step and open, and by sessions.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from swarm.errors import BadRequest, NoRoute, PeerTimeout, PeerUnavailable, SwarmError

T = TypeVar("T")


def is_timeout(e: BaseException) -> bool:
    """A timeout, raw or as PeerClient's PeerTimeout: inconclusive (dead, or alive but slow)."""
    return isinstance(e, (asyncio.TimeoutError, TimeoutError, PeerTimeout))


async def guarded(
    peer_id: Any,
    work: Awaitable[T],
    timeout: float,
    probe_after: float,
    probe: Callable[[], Awaitable[Any]],
) -> T:
    """Await `work` on `peer_id` for at most `timeout` s, calling `probe()` if it is slow.

    probe: a small request that raises at once if the peer's process is gone.
    Raises PeerUnavailable as soon as a probe shows the peer gone, asyncio.TimeoutError at the
    timeout; cancels `work` in both cases.
    """
    task = asyncio.ensure_future(work)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    pending_probe: asyncio.Future | None = None
    next_probe = loop.time() + probe_after
    try:
        while True:
            now = loop.time()
            if now >= deadline:
                raise asyncio.TimeoutError(f"no answer from peer {peer_id} in {timeout:.2f} s")
            if pending_probe is None and now >= next_probe:
                pending_probe = asyncio.ensure_future(probe())
            wake = deadline if pending_probe is not None else min(deadline, next_probe)
            waiting = {task} if pending_probe is None else {task, pending_probe}
            done, _ = await asyncio.wait(
                waiting, timeout=max(0.0, wake - now), return_when=asyncio.FIRST_COMPLETED
            )
            if task in done:
                return task.result()
            if pending_probe is not None and pending_probe in done:
                error = pending_probe.exception()
                if error is not None and not is_timeout(error):
                    raise PeerUnavailable(
                        f"peer {peer_id} is gone (a probe failed while a request waited: {error})"
                    ) from error
                # It answered (or the probe timed out): wait on, probe again later.
                pending_probe = None
                next_probe = loop.time() + max(probe_after, 0.5)
    finally:
        if not task.done():
            task.cancel()
        if pending_probe is not None and not pending_probe.done():
            pending_probe.cancel()


def is_peer_failure(e: BaseException) -> bool:
    """Errors that mean "this peer cannot go on": re-route around it. Others propagate."""
    if isinstance(e, (BadRequest, NoRoute, asyncio.CancelledError)):
        return False
    if isinstance(e, (SwarmError, TimeoutError, asyncio.TimeoutError, ConnectionError, OSError)):
        return True
    if isinstance(e, (EOFError, StopAsyncIteration, asyncio.IncompleteReadError)):
        return True
    # hivemind's P2PDaemonError / P2PHandlerError / ControlFailure: the daemon lost the peer.
    return type(e).__module__.startswith("hivemind")
