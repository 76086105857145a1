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


async def test_a_send_takes_the_link_when_called_not_when_awaited():
    """What was sent first arrives first: a push started before the reply to the client leaves
    ahead of it even if the push's task runs later (swarm.peer.push.Pushes.start)."""
    link = Link(delay=0.05)
    t0 = time.monotonic()
    first = link.send(10)
    time.sleep(0.03)  # the loop is busy: the sender builds its next message
    second = link.send(10)
    done = []

    async def arrive(name, sent):
        await sent
        done.append((name, time.monotonic() - t0))

    await asyncio.gather(arrive("second", second), arrive("first", first))
    assert [name for name, _ in done] == ["first", "second"]
    assert 0.05 <= done[0][1] < 0.075  # its 50 ms counted from the call, not from the await


async def test_a_push_on_an_emulated_link_leaves_when_started():
    """Pushes.start takes the link at once (the reply to the client is sent after it): with no
    P2P to push through, the push fails one delay after start, not after start + busy time."""
    from hivemind.p2p import PeerID

    from proto import peer_pb2
    from swarm.peer.push import Pushes

    pushes = Pushes(Link(delay=0.05), None, None, 1.0)
    t0 = time.monotonic()
    push = pushes.start(PeerID(b"x" * 34), peer_pb2.PushStep(session_id="s", position=0))
    time.sleep(0.03)
    error = await pushes.failure(push)
    assert error is not None and "no P2P" in error.message
    assert 0.05 <= time.monotonic() - t0 < 0.075


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
