"""Tests of petals_like.routing: least-latency chains over span records."""

from dataclasses import dataclass, field

import pytest

from petals_like.routing import Hop, RouteCosts, find_route, format_blocks, missing_blocks
from swarm.errors import NoRoute


@dataclass
class Rec:
    peer_id: str
    start: int
    end: int
    state: str = "online"
    inference_rps: float = 0.0
    throughput: float = 0.0
    cache_tokens_left: int = 100_000
    extra: dict = field(default_factory=dict)


COSTS = RouteCosts(default_rtt=0.01, hop_overhead=0.0, default_block_time=0.001)


def covers(hops, start, end):
    assert hops[0].start == start and hops[-1].end == end
    assert all(a.end == b.start for a, b in zip(hops, hops[1:], strict=False))


@pytest.mark.timeout(10)
def test_prefers_fewer_hops_when_compute_is_equal():
    recs = [Rec("a", 0, 3), Rec("b", 3, 6), Rec("c", 0, 6), Rec("d", 0, 2), Rec("e", 2, 6)]
    hops = find_route(recs, 0, 6, costs=COSTS)
    assert hops == [Hop("c", 0, 6)]


@pytest.mark.timeout(10)
def test_measured_round_trips_steer_the_route():
    recs = [Rec("a", 0, 3), Rec("b", 3, 6), Rec("c", 0, 6)]
    hops = find_route(recs, 0, 6, rtts={"a": 0.001, "b": 0.001, "c": 0.5}, costs=COSTS)
    assert hops == [Hop("a", 0, 3), Hop("b", 3, 6)]


@pytest.mark.timeout(10)
def test_slow_compute_is_avoided():
    # c is one hop but computes 100x slower per block than a and b.
    recs = [
        Rec("a", 0, 3, inference_rps=1000),
        Rec("b", 3, 6, inference_rps=1000),
        Rec("c", 0, 6, inference_rps=1.0),
    ]
    hops = find_route(recs, 0, 6, costs=COSTS)
    assert [h.peer_id for h in hops] == ["a", "b"]


@pytest.mark.timeout(10)
def test_sub_range_uses_part_of_longer_spans():
    recs = [Rec("a", 0, 6), Rec("b", 2, 4)]
    hops = find_route(recs, 2, 4, banned={"b"}, costs=COSTS)
    assert hops == [Hop("a", 2, 4)]
    covers(hops, 2, 4)


@pytest.mark.timeout(10)
def test_banned_and_offline_peers_are_skipped_even_if_their_records_live():
    recs = [Rec("a", 0, 3), Rec("b", 3, 6), Rec("b2", 3, 6, state="offline"), Rec("c", 0, 6)]
    hops = find_route(recs, 0, 6, banned={"c"}, costs=COSTS)
    assert hops == [Hop("a", 0, 3), Hop("b", 3, 6)]


@pytest.mark.timeout(10)
def test_no_route_names_the_missing_blocks():
    recs = [Rec("a", 0, 2), Rec("b", 4, 6), Rec("c", 2, 3)]
    assert missing_blocks(recs, 0, 6) == [3]
    with pytest.raises(NoRoute, match="3:4"):
        find_route(recs, 0, 6, costs=COSTS)
    with pytest.raises(NoRoute, match="2:4"):
        find_route(recs, 0, 6, banned={"c"}, costs=COSTS)


@pytest.mark.timeout(10)
def test_cache_shortage_is_a_last_resort():
    recs = [Rec("a", 0, 6, cache_tokens_left=10), Rec("b", 0, 3), Rec("c", 3, 6)]
    assert [h.peer_id for h in find_route(recs, 0, 6, cache_tokens_needed=100, costs=COSTS)] == [
        "b",
        "c",
    ]
    only = [Rec("a", 0, 6, cache_tokens_left=10)]
    assert find_route(only, 0, 6, cache_tokens_needed=100, costs=COSTS) == [Hop("a", 0, 6)]


@pytest.mark.timeout(10)
def test_advertised_next_pings_estimate_unmeasured_peers():
    # From a, b is advertised close and b2 far; neither was measured by the client.
    a = Rec("a", 0, 3, extra={"next_pings": {"b": 0.001, "b2": 0.3}})
    recs = [a, Rec("b2", 3, 6), Rec("b", 3, 6)]
    hops = find_route(recs, 0, 6, rtts={"a": 0.001}, costs=COSTS)
    assert hops[-1].peer_id == "b"


@pytest.mark.timeout(10)
def test_many_peers_route_is_contiguous():
    import random

    rng = random.Random(1)
    recs = []
    for i in range(60):
        s = rng.randrange(0, 30)
        recs.append(
            Rec(f"p{i}", s, min(32, s + rng.randrange(1, 8)), inference_rps=rng.uniform(5, 50))
        )
    recs += [Rec("lo", 0, 16), Rec("hi", 16, 32)]
    covers(find_route(recs, 0, 32, costs=COSTS), 0, 32)


@pytest.mark.timeout(10)
def test_format_blocks():
    assert format_blocks([3, 4, 5, 9]) == "3:6, 9:10"
    assert format_blocks([]) == ""


@dataclass
class RelayedRec(Rec):
    reachability: str = "relayed"


@pytest.mark.timeout(10)
def test_unmeasured_relayed_hops_cost_more_and_measured_ones_their_round_trip():
    costs = RouteCosts(
        default_rtt=0.01, relayed_rtt=0.1, hop_overhead=0.0, default_block_time=0.001
    )
    recs = [RelayedRec("nat", 0, 6), Rec("a", 0, 3), Rec("b", 3, 6)]
    assert find_route(recs, 0, 6, costs=costs) == [Hop("a", 0, 3), Hop("b", 3, 6)]
    hops = find_route(recs, 0, 6, rtts={"nat": 0.002}, costs=costs)
    assert hops == [Hop("nat", 0, 6)]


def test_a_floor_on_block_time_caps_what_a_peer_advertises():
    honest = Rec("h", 0, 6, inference_rps=100.0)
    boaster = Rec("x", 0, 6, inference_rps=1e9)  # claims a billion steps per second
    rtts = {"h": 0.01, "x": 0.01}
    assert find_route([honest, boaster], 0, 6, rtts=rtts, costs=COSTS)[0].peer_id == "x"
    floor = {"x": 1.0 / (100.0 * 6)}  # believed no faster than the honest one
    hops = find_route([boaster, honest], 0, 6, rtts=rtts, costs=COSTS, block_time_floor=floor)
    assert hops[0].peer_id == "x"  # a tie: order decides; it gains nothing from the number
    floor = {"x": 1.0 / (50.0 * 6)}  # measured slower than the honest one
    hops = find_route([boaster, honest], 0, 6, rtts=rtts, costs=COSTS, block_time_floor=floor)
    assert hops[0].peer_id == "h"
