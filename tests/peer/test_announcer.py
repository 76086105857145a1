"""The announcer on real hivemind DHTs: records stored, refreshed, expired, tombstoned and pinged.

Tests swarm/peer/announcer.py in one process: two DHTs, the second answering pings with a handler.
"""

from __future__ import annotations

import asyncio
import contextlib
from functools import partial

import hivemind
import pytest

from swarm.dht import make_dht
from swarm.model.loading import load_span
from swarm.peer.announcer import Announcer
from swarm.peer.backend import SpanBackend
from swarm.peer.client import PeerClient
from swarm.peer.config import PeerConfig
from swarm.peer.dht_view import fetch_models, fetch_swarm_async
from swarm.peer.handler import PeerHandler
from swarm.peer.memory import CacheBudget
from swarm.peer.records import ModelEntry
from swarm.peer.throughput import BlockThroughput
from swarm.peer.worker import ComputeWorker

# One event loop for the module: a DHT's P2P replica dies with the loop that made it.
pytestmark = [pytest.mark.timeout(60), pytest.mark.asyncio(loop_scope="module")]

PERIOD = 1.0  # announce period: records live 2 s
SPEED = BlockThroughput(inference_rps=30.0, forward_tps=300.0)
CONFIG = PeerConfig(announce_period=PERIOD, dht_timeout=5.0, quant="int8")


@pytest.fixture(scope="module")
def dhts():
    first = make_dht(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    boot = [str(m) for m in first.get_visible_maddrs()]
    second = make_dht(start=True, initial_peers=boot, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    yield first, second
    second.shutdown()
    first.shutdown()


def announcer(dht: hivemind.DHT, prefix: str, config: PeerConfig = CONFIG) -> Announcer:
    entry = ModelEntry(prefix, num_blocks=6, hidden_size=64)
    return Announcer(dht, config, entry, dht.peer_id.to_base58(), ["/ip4/127.0.0.1/tcp/9"])


@contextlib.asynccontextmanager
async def serving_3_6(p2p, model_dir, prefix: str):
    """A real handler for blocks 3:6 on `p2p`: it answers pings (an `info` call)."""
    worker = ComputeWorker()
    backend = SpanBackend(load_span(str(model_dir), 3, 6, progress=False))
    handler = PeerHandler(backend, worker, CacheBudget(0), CONFIG, prefix)
    await handler.add_p2p_handlers(p2p)
    try:
        yield handler
    finally:
        await handler.remove_p2p_handlers(p2p)
        worker.stop()


async def until(predicate, timeout: float = 10.0):
    """Await `predicate()` (a coroutine function) until it returns something truthy."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (value := await predicate()):
        assert loop.time() < deadline, f"timed out after {timeout:.0f} s"
        await asyncio.sleep(0.1)
    return value


async def test_records_are_announced_refreshed_and_then_expire(dhts):
    dht = dhts[0]
    a = announcer(dht, "announced")
    assert await a.announce(a.record("joining", 0, 3, SPEED, 100, ["none"]))
    (r,) = await fetch_swarm_async(dht, "announced", 6)
    assert (r.peer_id, r.start, r.end, r.state) == (a.peer_id, 0, 3, "joining")
    assert (r.quant, r.cache_tokens_left, r.codecs, r.addrs) == ("int8", 100, ("none",), a.addrs)
    assert r.throughput == r.forward_tps == 100.0 and r.inference_rps == 10.0 and r.run_id == ""
    assert a.entry in await asyncio.to_thread(fetch_models, dht, 5.0)

    state = "joining"
    task = asyncio.create_task(a.run(lambda: a.record(state, 0, 3, SPEED, 50)))
    try:
        state = "online"

        async def online():
            records = await fetch_swarm_async(dht, "announced", 6)
            return records and records[0].state == "online" and records[0].cache_tokens_left == 50

        await until(online)
        await asyncio.sleep(3 * PERIOD)  # past a record's life: only refreshing keeps it
        assert await online()
    finally:
        task.cancel()

    async def gone():
        return not await fetch_swarm_async(dht, "announced", 6)

    # Records expire two periods after the last store, if the cancel stopped the announcer: on
    # CI a record was still read 7 s, then 22 s after it, as long as one looked. Python 3.11's
    # wait_for had returned a store's result over the cancel, and the loop ran on (swarm.loops
    # .within). The margin is for reads on 2 busy cores.
    await until(gone, 2 * PERIOD + 8.0)
    assert task.cancelled()


async def test_a_move_leaves_tombstones_that_the_live_span_outranks(dhts):
    dht = dhts[0]
    a = announcer(dht, "moved")
    await a.announce(a.record("online", 0, 3, SPEED, 0))
    await a.announce(a.record("online", 2, 5, SPEED, 0))
    await a.announce(a.record("offline", 0, 3, SPEED, 0), blocks=[0, 1])
    (live,) = await fetch_swarm_async(dht, "moved", 6)
    assert (live.start, live.end, live.state) == (2, 5, "online")
    (tomb,) = await fetch_swarm_async(dht, "moved", 2)  # what blocks 0 and 1 hold
    assert (tomb.start, tomb.end, tomb.state) == (0, 3, "offline")


async def test_next_hop_pings_go_into_records_of_that_span(dhts, tiny_model_dir):
    first, second = dhts
    prefix = "pinged"
    p2p_a, p2p_b = await first.replicate_p2p(), await second.replicate_p2p()
    a, b = announcer(first, prefix), announcer(second, prefix)
    fetch_a = partial(fetch_swarm_async, first, prefix, 6)
    fetch_b = partial(fetch_swarm_async, second, prefix, 6)
    tasks = []
    async with serving_3_6(p2p_b, tiny_model_dir, prefix):  # the second peer serves 3:6
        try:
            await b.announce(b.record("online", 3, 6, SPEED, 0))
            await a.announce(a.record("online", 0, 3, SPEED, 0))
            warmed: list[list[str]] = []  # the next hops whose push streams a peer opens ahead
            loop_a = a.ping_loop(PeerClient(p2p_a), fetch_a, warmed.append)
            tasks.append(asyncio.create_task(loop_a))
            tasks.append(asyncio.create_task(b.ping_loop(PeerClient(p2p_b), fetch_b)))

            async def pinged():
                return b.peer_id in a.record("online", 0, 3, SPEED, 0).next_pings

            await until(pinged)
            assert 0 < a.record("online", 0, 3, SPEED, 0).next_pings[b.peer_id] < 2.0
            assert [b.peer_id] in warmed
            assert a.record("joining", 1, 4, SPEED, 0).next_pings == {}  # not yet timed for 4
            assert b.pings_end == 6 and b.record("online", 3, 6, SPEED, 0).next_pings == {}
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_next_hop_that_starts_later_is_found_before_the_next_period(dhts, tiny_model_dir):
    """A new swarm's peers start one by one: a peer that found no next hop looks again after
    NO_NEXT_HOP_RETRY s, not a whole announce period (60 s here), so that its push stream to
    the next hop is open before the first session's push."""
    from swarm.peer.announcer import NO_NEXT_HOP_RETRY

    first, second = dhts
    prefix = "late-next-hop"
    p2p_a, p2p_b = await first.replicate_p2p(), await second.replicate_p2p()
    slow = PeerConfig(announce_period=60.0, dht_timeout=5.0, quant="int8")  # records last 120 s
    a, b = announcer(first, prefix, slow), announcer(second, prefix, slow)
    warmed: list[list[str]] = []
    fetch_a = partial(fetch_swarm_async, first, prefix, 6)
    task = None
    async with serving_3_6(p2p_b, tiny_model_dir, prefix):
        try:
            await a.announce(a.record("online", 0, 3, SPEED, 0))
            task = asyncio.create_task(a.ping_loop(PeerClient(p2p_a), fetch_a, warmed.append))
            await asyncio.sleep(1.0)  # its first look found no next hop
            assert warmed == [[]]
            await b.announce(b.record("online", 3, 6, SPEED, 0))

            async def found():
                return [b.peer_id] in warmed

            await until(found, NO_NEXT_HOP_RETRY + 8.0)
        finally:
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
