"""Choice of a chain of peers covering a block range, at the least expected step latency.

Pure functions over span records: used by the router (petals_like/router.py), sessions and the CLI.
"""

from __future__ import annotations

import copy
import dataclasses
import heapq
import itertools
import random
from collections.abc import Container, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from swarm.errors import NoRoute
from swarm.peer import format_blocks


@dataclass(frozen=True)
class Hop:
    """Blocks [start, end) run by one peer in a route."""

    peer_id: Any
    start: int
    end: int

    def __len__(self) -> int:
        return self.end - self.start


@dataclass
class RouteCosts:
    """The cost model, in seconds per decoding step.

    default_rtt: round trip assumed for a peer nobody has measured yet.
    relayed_rtt: the same for a peer behind NAT served through a circuit relay (two legs);
        once measured, a relayed hop costs its measured round trip like any other.
    hop_overhead: serialization and scheduling per hop, paid on top of the round trip.
    default_block_time: compute time of one block for one step when a peer advertises none.
    cache_penalty: added to a hop whose peer lacks the cache this session needs, so that it is
        chosen only when nothing else covers the blocks.
    jitter: relative random noise on compute costs, which spreads clients over equal replicas.
    """

    default_rtt: float = 0.05
    relayed_rtt: float = 0.1
    hop_overhead: float = 0.002
    default_block_time: float = 0.005
    cache_penalty: float = 10.0
    jitter: float = 0.0


_NO_DEFAULT = RouteCosts(default_block_time=float("inf"))  # a record that advertises nothing


def _peer_key(peer_id: Any) -> str:
    return peer_id.to_base58() if hasattr(peer_id, "to_base58") else str(peer_id)


def _next_pings(record: Any) -> dict:
    """Round trips a peer advertises to its successors (an attribute or an extra record field)."""
    pings = getattr(record, "next_pings", None)
    if pings is None:
        pings = (getattr(record, "extra", None) or {}).get("next_pings")
    return pings if isinstance(pings, dict) else {}


def block_time(record: Any, costs: RouteCosts) -> float:
    """Seconds one block of this peer takes for one decoding step, from what it advertises.

    `inference_rps` is single-token steps/s through the whole span; `throughput` is tokens/s per
    block with the peer's compute shared over its span (swarm.peer.records.SpanRecord).
    """
    length = max(1, record.end - record.start)
    rps = getattr(record, "inference_rps", None) or 0.0
    if rps > 0:
        return 1.0 / (rps * length)
    throughput = getattr(record, "throughput", None) or 0.0
    if throughput > 0:
        return 1.0 / (throughput * length)
    return costs.default_block_time


def believed(record: Any, min_block_time: float) -> Any:
    """`record` with its advertised speed cut to at most 1 / min_block_time blocks per second."""
    if min_block_time <= 0 or block_time(record, _NO_DEFAULT) >= min_block_time:
        return record
    length = max(1, record.end - record.start)
    speed = 1.0 / (min_block_time * length)
    if dataclasses.is_dataclass(record):
        return dataclasses.replace(record, inference_rps=speed, throughput=speed)
    record = copy.copy(record)
    record.inference_rps = record.throughput = speed
    return record


def has_cache_for(record: Any, tokens_needed: int | None) -> bool:
    """Whether the peer advertises room for a session of `tokens_needed` (batch * max_length)."""
    left = getattr(record, "cache_tokens_left", None)
    if tokens_needed is None or left is None:
        return True
    return tokens_needed <= left


def usable(records: Sequence[Any], banned: Container[Hashable] = ()) -> list[Any]:
    """Records of peers that are online and not banned."""
    out = []
    for r in records:
        state = getattr(r, "state", "online")
        state = getattr(state, "name", state)
        if str(state).lower() != "online" or r.peer_id in banned:
            continue
        out.append(r)
    return out


def missing_blocks(
    records: Sequence[Any], start: int, end: int, banned: Container[Hashable] = ()
) -> list[int]:
    """Blocks in [start, end) that no usable peer serves."""
    covered = set()
    for r in usable(records, banned):
        covered.update(range(max(r.start, start), min(r.end, end)))
    return [b for b in range(start, end) if b not in covered]


MAX_PER_BLOCK = 12  # peers per block the route search considers (the cheapest by expected cost)


def best_candidates(
    cands: Sequence[Any],
    start: int,
    end: int,
    rtts: Mapping[Hashable, float],
    costs: RouteCosts,
    per_block: int,
) -> list[Any]:
    """The peers worth searching: for each block, the `per_block` cheapest that serve it.

    A peer's cost per block is its compute per block plus its round trip spread over the blocks
    it can run here; the union over blocks keeps every block covered.
    """
    if len(cands) <= per_block:
        return list(cands)
    scored = []
    for r in cands:
        blocks = min(r.end, end) - max(r.start, start)
        rtt = rtts.get(r.peer_id, costs.default_rtt)
        scored.append(((rtt + costs.hop_overhead) / blocks + block_time(r, costs), id(r), r))
    scored.sort(key=lambda s: s[:2])
    kept: dict[int, Any] = {}
    count = [0] * (end - start)
    for _, key, r in scored:
        lo, hi = max(r.start, start), min(r.end, end)
        if any(count[b - start] < per_block for b in range(lo, hi)):
            kept[key] = r
            for b in range(lo, hi):
                count[b - start] += 1
    return [r for r in cands if id(r) in kept]


def find_route(
    records: Sequence[Any],
    start: int,
    end: int,
    *,
    rtts: Mapping[Hashable, float] | None = None,
    banned: Container[Hashable] = (),
    cache_tokens_needed: int | None = None,
    costs: RouteCosts | None = None,
    rng: random.Random | None = None,
    max_per_block: int = MAX_PER_BLOCK,
    block_time_floor: Mapping[Hashable, float] | None = None,
) -> list[Hop]:
    """The chain of hops covering blocks [start, end) with the least expected step latency.

    The client relays every hop, so a hop costs the client's round trip to its peer (measured in
    `rtts`; for an unmeasured peer, the round trip its predecessor advertises to it in
    `next_pings`, else `costs.default_rtt`), plus the peer's compute per block and a penalty when
    its cache is short. A peer may be left at any block boundary, which lets a route replace
    exactly a lost span with part of a longer one. Raises NoRoute naming the uncovered blocks.
    Only the `max_per_block` most promising peers of each block are searched (best_candidates),
    so a route through a swarm of a thousand peers is found in milliseconds.
    block_time_floor: peer -> the least seconds per block we believe of it (the router's cap
        on what unmeasured peers advertise); a peer's advertised figure is raised to it.
    """
    costs = costs or RouteCosts()
    rtts = rtts or {}
    rng = rng or random.Random(0)
    if not 0 <= start < end:
        raise ValueError(f"bad block range {start}:{end}")
    gap = missing_blocks(records, start, end, banned)
    if gap:
        raise NoRoute(f"no reachable peer serves blocks {format_blocks(gap)}")
    cands = [r for r in usable(records, banned) if r.start < end and r.end > start]
    floor = block_time_floor or {}
    if floor:
        cands = [believed(r, floor.get(r.peer_id, 0.0)) for r in cands]
    cands = best_candidates(cands, start, end, rtts, costs, max_per_block)
    compute = []
    for r in cands:
        noise = 1.0 + costs.jitter * (2 * rng.random() - 1) if costs.jitter else 1.0
        compute.append(block_time(r, costs) * noise)

    def hop_cost(j: int, prev: int | None) -> float:
        r = cands[j]
        rtt = rtts.get(r.peer_id)
        if rtt is None and prev is not None:
            pings = _next_pings(cands[prev])
            rtt = pings.get(_peer_key(r.peer_id))
        if rtt is None:
            relayed = getattr(r, "reachability", "direct") == "relayed"
            rtt = costs.relayed_rtt if relayed else costs.default_rtt
        cost = rtt + costs.hop_overhead
        if not has_cache_for(r, cache_tokens_needed):
            cost += costs.cache_penalty
        return cost

    # Node (j, b): the activations sit on candidate j, which is about to run block b.
    # END is reached from (j, end). Dijkstra on a graph of at most |cands| * |blocks| nodes.
    end_node = (-1, end)
    dist: dict[tuple[int, int], float] = {}
    parent: dict[tuple[int, int], tuple[int, int] | None] = {}
    tie = itertools.count()
    heap: list[tuple[float, int, tuple[int, int], tuple[int, int] | None]] = []
    for j, r in enumerate(cands):
        if r.start <= start < r.end:
            heap.append((hop_cost(j, None), next(tie), (j, start), None))
    heapq.heapify(heap)
    while heap:
        d, _, node, par = heapq.heappop(heap)
        if node in dist:
            continue
        dist[node], parent[node] = d, par
        if node == end_node:
            break
        j, b = node
        if b == end:
            heapq.heappush(heap, (d, next(tie), end_node, node))
            continue
        # Run block b here, then either stay on this peer or move to another for block b+1.
        nb = b + 1
        d_run = d + compute[j]
        if nb == end:
            heapq.heappush(heap, (d_run, next(tie), (j, nb), node))
            continue
        if cands[j].end > nb and (j, nb) not in dist:
            heapq.heappush(heap, (d_run, next(tie), (j, nb), node))
        for k, r in enumerate(cands):
            if k != j and r.start <= nb < r.end and (k, nb) not in dist:
                heapq.heappush(heap, (d_run + hop_cost(k, j), next(tie), (k, nb), node))
    if end_node not in dist:
        raise NoRoute(f"no chain of reachable peers covers blocks {start}:{end}")

    # Every node (j, b) on the path with b < end means: candidate j runs block b.
    nodes = []
    node: tuple[int, int] | None = parent[end_node]
    while node is not None:
        nodes.append(node)
        node = parent.get(node)
    nodes.reverse()
    hops: list[Hop] = []
    last_j = None
    for j, b in nodes:
        if b == end:
            continue
        if j == last_j:
            hops[-1] = Hop(hops[-1].peer_id, hops[-1].start, b + 1)
        else:
            hops.append(Hop(cands[j].peer_id, b, b + 1))
        last_j = j
    return hops


def describe(hops: Sequence[Hop]) -> str:
    """'0:2 via ...abc123 => 2:6 via ...def456' for logs and the CLI summary."""
    return " => ".join(f"{h.start}:{h.end} via ...{_peer_key(h.peer_id)[-6:]}" for h in hops)
