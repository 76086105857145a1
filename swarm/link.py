"""User-space WAN emulation: every message this process sends to the mesh pays a one-way delay
and, optionally, a bandwidth cap. This kernel has no netem; the real network stays untouched.

Used by PeerClient (what a client or peer sends) and the peer's handler (what it answers):
`swarm-peer join --link-delay` and `swarm-generate --link-delay`.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Coroutine
from typing import Any

from swarm.errors import BadRequest


class Link:
    """This process's uplink: `delay` seconds one way, `bandwidth_mbps` megabits/s (0: no cap).

    Messages queue for the bandwidth (one uplink, as a home connection), then travel `delay`
    seconds in parallel. A round trip between two processes that both set 50 ms costs 100 ms.
    """

    def __init__(self, delay: float = 0.0, bandwidth_mbps: float = 0.0):
        if not (math.isfinite(delay) and delay >= 0):
            raise BadRequest(f"the link delay must be a number of seconds >= 0, got {delay}")
        if not (math.isfinite(bandwidth_mbps) and bandwidth_mbps >= 0):
            raise BadRequest(f"the link bandwidth must be Mbit/s >= 0, got {bandwidth_mbps}")
        self.delay, self.bandwidth_mbps = delay, bandwidth_mbps
        self._free_at = 0.0  # when the uplink has sent everything queued so far

    @property
    def emulated(self) -> bool:
        return self.delay > 0 or self.bandwidth_mbps > 0

    def send(self, nbytes: int) -> Coroutine[Any, Any, None]:
        """Send `nbytes` now: awaiting the result waits until they have arrived (queueing and
        delay included). The uplink is taken at the call, not at the await, so a message sent
        first arrives first even if its sender gets to wait later (a push ahead of a reply)."""
        if not self.emulated:
            return _arrived()
        now = time.monotonic()
        wire_s = nbytes * 8 / (self.bandwidth_mbps * 1e6) if self.bandwidth_mbps else 0.0
        self._free_at = max(now, self._free_at) + wire_s
        return _until(self._free_at + self.delay)


async def _arrived() -> None:
    return None


async def _until(deadline: float) -> None:
    """Sleep until time.monotonic() reaches `deadline` (the event loop's clock too)."""
    await asyncio.sleep(max(0.0, deadline - time.monotonic()))


NO_LINK = Link()
