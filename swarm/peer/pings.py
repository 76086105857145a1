"""Next-hop round trips: a peer times a tiny RPC to the peers serving the block after its span.

Used by `swarm.peer.announcer`, which announces them as `SpanRecord.next_pings`; the client's
router (petals_like) adds them as server->server edges, as Petals' servers advertise theirs.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Iterable

from swarm.errors import SwarmError
from swarm.peer.client import PeerClient
from swarm.peer.records import SpanRecord

logger = logging.getLogger(__name__)

MAX_PINGED = 5  # next-hop peers timed per period (a random sample when there are more)
PING_TIMEOUT = 2.0  # seconds one round trip may take before the peer is left out
PINGS_PER_PEER = 2  # the first call may include dialling: keep the fastest


def next_hop_peers(
    records: Iterable[SpanRecord],
    end: int,
    self_id: str,
    max_peers: int = MAX_PINGED,
    rng: random.Random | None = None,
) -> list[str]:
    """Online peers (not us) whose span holds block `end`, the block right after ours."""
    found = sorted(
        {r.peer_id for r in records if r.state == "online" and r.start <= end < r.end} - {self_id}
    )
    if len(found) > max_peers:
        found = sorted((rng or random).sample(found, max_peers))
    return found


async def measure_rtt(
    client: PeerClient, peer_id: str, timeout: float = PING_TIMEOUT
) -> float | None:
    """The fastest of PINGS_PER_PEER round trips to `peer_id`, or None if none answered."""
    best = None
    for _ in range(PINGS_PER_PEER):
        try:
            rtt = await client.ping(peer_id, timeout)
        except SwarmError as e:
            logger.debug("ping to %s failed: %s", peer_id, e)
            break
        best = rtt if best is None else min(best, rtt)
    return best


async def measure_next_pings(
    client: PeerClient, peer_ids: list[str], timeout: float = PING_TIMEOUT
) -> dict[str, float]:
    """Round trips (seconds) to each of `peer_ids`, concurrently; silent ones are left out."""
    rtts = await asyncio.gather(*(measure_rtt(client, p, timeout) for p in peer_ids))
    return {p: rtt for p, rtt in zip(peer_ids, rtts, strict=True) if rtt is not None}
