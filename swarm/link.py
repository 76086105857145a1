"""User-space WAN emulation: every message this process sends to the mesh pays a one-way delay
and, optionally, a bandwidth cap. This kernel has no netem; the real network stays untouched.

Used by PeerClient (what a client or peer sends) and the peer's handler (what it answers):
`swarm-peer join --link-delay` and `swarm-generate --link-delay`.
"""

from __future__ import annotations

import asyncio
import math
import time

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

    async def send(self, nbytes: int) -> None:
        """Wait as long as sending `nbytes` over this link takes, queueing and delay included."""
        if not self.emulated:
            return
        now = time.monotonic()
        wire_s = nbytes * 8 / (self.bandwidth_mbps * 1e6) if self.bandwidth_mbps else 0.0
        self._free_at = max(now, self._free_at) + wire_s
        await asyncio.sleep(self._free_at - now + self.delay)


NO_LINK = Link()
