"""Tests of SWARM adaptive rebalancing: who moves, where, and that moves settle.

Run by pytest; the training peers and the churn simulator rely on these guarantees.
"""

import random

import pytest

from swarm.training.rebalance import (
    StageStats,
    choose_join_stage,
    choose_move,
    least_loaded,
    most_loaded,
)


def stats(*throughputs, demand=1.0, replicas=None):
    replicas = replicas or [max(1, round(t)) for t in throughputs]
    return [StageStats(demand, t, r) for t, r in zip(throughputs, replicas, strict=True)]


def test_least_and_most_loaded():
    s = stats(5.0, 2.0, 8.0)
    assert least_loaded(s) == 2 and most_loaded(s) == 1
    assert choose_join_stage(s) == 1
    # Demand counts: stage 0 has twice the work, so 6/2 = 3 is its capacity.
    s = [StageStats(2.0, 6.0, 6), StageStats(1.0, 4.0, 4)]
    assert most_loaded(s) == 0


def test_peer_of_least_loaded_stage_moves_to_bottleneck():
    s = stats(5.0, 2.0, 8.0)
    assert choose_move(s, my_stage=2, my_throughput=1.0) == 1
    assert choose_move(s, my_stage=0, my_throughput=1.0) is None  # not the least loaded
    assert choose_move(s, my_stage=1, my_throughput=1.0) is None  # already the bottleneck


def test_keeps_one_replica():
    s = [StageStats(1.0, 10.0, 1), StageStats(1.0, 1.0, 1)]
    assert choose_move(s, my_stage=0, my_throughput=10.0) is None


def test_hysteresis_needs_a_clear_gap():
    # Gap 1.1 < (1 + 0.2) * 1.0: moving would nearly swap the two stages' roles.
    s = stats(5.1, 4.0)
    assert choose_move(s, my_stage=0, my_throughput=1.0) is None
    assert choose_move(s, my_stage=0, my_throughput=1.0, min_gain=0.0) == 1
    s = stats(5.3, 4.0)
    assert choose_move(s, my_stage=0, my_throughput=1.0) == 1


def test_per_stage_throughput_and_zero_capacity_stage():
    s = [StageStats(1.0, 6.0, 3), StageStats(1.0, 0.0, 0)]
    assert choose_move(s, my_stage=0, my_throughput={0: 2.0, 1: 1.0}) == 1
    assert choose_move(s, my_stage=0, my_throughput=[2.0, 0.0]) is None


def test_rejects_bad_input():
    with pytest.raises(ValueError):
        StageStats(-1.0, 1.0, 1)
    with pytest.raises(ValueError):
        choose_move(stats(1.0), my_stage=3, my_throughput=1.0)
    with pytest.raises(ValueError):
        least_loaded([])


@pytest.mark.parametrize("seed", range(10))
def test_peers_moving_in_turn_settle(seed):
    rng = random.Random(seed)
    num_stages = rng.randint(2, 8)
    demand = [rng.uniform(0.5, 2.0) for _ in range(num_stages)]
    peers = [(rng.randrange(num_stages), rng.uniform(0.5, 3.0)) for _ in range(60)]

    def current():
        return [
            StageStats(
                demand[s],
                sum(t for st, t in peers if st == s),
                sum(1 for st, _ in peers if st == s),
            )
            for s in range(num_stages)
        ]

    bottleneck = min(x.capacity for x in current())
    replicas_before = [x.replicas for x in current()]
    for _ in range(200):
        moved = False
        for i, (stage, speed) in enumerate(peers):
            target = choose_move(current(), stage, speed)
            if target is not None:
                peers[i] = (target, speed)
                moved = True
        if not moved:
            break
    else:
        raise AssertionError("peers kept moving")
    assert min(x.capacity for x in current()) >= bottleneck
    # No stage that had a replica lost its last one.
    assert all(x.replicas >= 1 for x, r in zip(current(), replicas_before, strict=True) if r)
