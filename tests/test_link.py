"""The emulated link: a one-way delay on every send, and a bandwidth cap that queues sends.

Tests swarm/link.py (through real peers in tests/peer/test_rpc.py).
"""

from __future__ import annotations

import asyncio
import time

import pytest

from swarm.errors import BadRequest
from swarm.link import NO_LINK, Link


async def test_sends_pay_the_delay_in_parallel_and_the_bandwidth_in_turn():
    link = Link(delay=0.05)
    t0 = time.monotonic()
    await asyncio.gather(*(link.send(10) for _ in range(5)))
    assert time.monotonic() - t0 >= 0.05  # delays overlap: five sends are not 5 x 50 ms
    capped = Link(bandwidth_mbps=8.0)  # 1 MB/s
    t0 = time.monotonic()
    await asyncio.gather(capped.send(50_000), capped.send(50_000))
    assert time.monotonic() - t0 >= 0.1  # 100 kB queued on one uplink


async def test_no_link_costs_nothing():
    assert not NO_LINK.emulated
    t0 = time.monotonic()
    for _ in range(1000):
        await NO_LINK.send(1 << 20)
    assert time.monotonic() - t0 < 1.0


@pytest.mark.parametrize("delay, bw", [(-1, 0), (float("nan"), 0), (0, -5), (0, float("inf"))])
def test_bad_settings_are_refused(delay, bw):
    with pytest.raises(BadRequest):
        Link(delay, bw)
