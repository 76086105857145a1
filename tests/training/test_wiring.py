"""Tests of SWARM stochastic wiring: proportional load, bans, membership, the EMA.

Run by pytest; the trainer and the churn simulator drive the same class.
"""

import random
from collections import Counter

import pytest

from swarm.errors import NoRoute
from swarm.training.wiring import (
    BACKWARD_TASK_FACTOR,
    FixedWiring,
    NoReplica,
    StochasticWiring,
    ThroughputEMA,
)


def test_ema_is_bias_corrected():
    ema = ThroughputEMA()
    assert ema.samples_per_second == 0.0
    ema.update(task_size=10, elapsed_s=2.0)
    assert ema.samples_per_second == pytest.approx(5.0)  # no pull towards 0 after one sample
    for _ in range(200):
        ema.update(task_size=10, elapsed_s=1.0)
    assert ema.samples_per_second == pytest.approx(10.0, rel=1e-6)


def test_backward_factor_is_swarms():
    assert BACKWARD_TASK_FACTOR == 2.5


def test_no_replica_is_typed():
    wiring = StochasticWiring(random.Random(0))
    with pytest.raises(NoReplica):
        wiring.choose(0, now=0.0)
    wiring.set_peers(0, [])
    with pytest.raises(NoRoute):
        wiring.choose(0, now=0.0)


def test_unmeasured_peers_are_all_tried_first():
    wiring = StochasticWiring(random.Random(0))
    wiring.set_peers(0, ["a", "b", "c"])
    first = {wiring.choose(0, now=0.0) for _ in range(3)}
    assert first == {"a", "b", "c"}


def test_load_follows_measured_throughput():
    wiring = StochasticWiring(random.Random(1))
    wiring.set_peers(0, ["fast", "slow"])
    speed = {"fast": 30.0, "slow": 10.0}
    counts = Counter()
    for _ in range(4000):
        peer = wiring.choose(0, now=0.0, task_size=4)
        wiring.report_success(peer, task_size=4, elapsed_s=4 / speed[peer])
        counts[peer] += 1
    assert counts["fast"] / counts["slow"] == pytest.approx(3.0, rel=0.05)
    assert wiring.throughput("fast") == pytest.approx(30.0)


def test_new_peer_is_tried_at_once():
    wiring = StochasticWiring(random.Random(2))
    wiring.set_peers(0, ["a", "b"])
    for _ in range(100):
        peer = wiring.choose(0, now=0.0)
        wiring.report_success(peer, 1, 0.1)
    wiring.set_peers(0, ["a", "b", "new"])
    assert wiring.choose(0, now=0.0) == "new"


def test_ban_then_return_and_bounded_exhaustion():
    wiring = StochasticWiring(random.Random(3))
    wiring.set_peers(0, ["a", "b"])
    wiring.report_failure("a", now=10.0, ban_s=30.0)
    assert wiring.is_banned("a", 20.0) and not wiring.is_banned("a", 41.0)
    assert {wiring.choose(0, now=20.0) for _ in range(10)} == {"b"}
    wiring.report_failure("b", now=20.0, ban_s=30.0)
    with pytest.raises(NoReplica):
        wiring.choose(0, now=25.0)
    assert wiring.choose(0, now=40.0) == "a"  # a's ban ended; b's has not
    assert {wiring.choose(0, now=51.0) for _ in range(10)} == {"a", "b"}


def test_set_peers_removes_and_moves_peers():
    wiring = StochasticWiring(random.Random(4))
    wiring.set_peers(0, ["a", "b"])
    wiring.set_peers(1, ["c"])
    wiring.set_peers(0, ["a"])
    assert {wiring.choose(0, now=0.0) for _ in range(5)} == {"a"}
    wiring.set_peers(1, ["c", "a"])  # a rebalanced into stage 1
    assert wiring.peers(0) == [] and wiring.peers(1) == ["a", "c"]
    with pytest.raises(NoReplica):
        wiring.choose(0, now=0.0)
    wiring.report_success("gone", 1, 1.0)  # unknown peers are ignored, not an error


def test_banned_peer_stays_banned_across_set_peers():
    wiring = StochasticWiring(random.Random(5))
    wiring.set_peers(0, ["a", "b"])
    wiring.report_failure("a", now=0.0, ban_s=100.0)
    wiring.set_peers(0, ["a", "b"])
    assert {wiring.choose(0, now=1.0) for _ in range(10)} == {"b"}


def test_deterministic_for_a_seed():
    def run(seed):
        wiring = StochasticWiring(random.Random(seed))
        wiring.set_peers(0, [f"p{i}" for i in range(20)])
        return [wiring.choose(0, now=0.0) for _ in range(50)]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_rejects_bad_task_size():
    wiring = StochasticWiring(random.Random(0))
    wiring.set_peers(0, ["a"])
    with pytest.raises(ValueError):
        wiring.choose(0, now=0.0, task_size=0)
    with pytest.raises(ValueError):
        wiring.report_success("a", 0, 1.0)


def test_fixed_lanes_stall_until_a_replacement_takes_the_slot():
    wiring = FixedWiring(pipelines=2)
    wiring.set_peers(0, ["a", "b"])
    wiring.set_peers(1, ["c", "d"])
    # Lane i is always the i-th peer of each stage: no adapting to speed.
    assert [wiring.choose(0, 0.0, lane=i) for i in range(4)] == ["a", "b", "a", "b"]
    wiring.report_failure("b", now=0.0, ban_s=10.0)
    with pytest.raises(NoReplica):
        wiring.choose(0, now=1.0, lane=1)  # its pipeline waits for b...
    assert wiring.choose(0, now=1.0, lane=0) == "a"
    wiring.set_peers(0, ["a", "b", "e"], now=1.0)  # ...until a replacement joins
    assert wiring.choose(0, now=1.0, lane=1) == "e"
    # A newcomer while every slot is taken is a spare; it fills the next hole.
    wiring.set_peers(1, ["c", "d", "f"], now=20.0)
    assert [wiring.choose(1, 20.0, lane=i) for i in range(2)] == ["c", "d"]
    wiring.set_peers(1, ["c", "f"], now=21.0)
    assert wiring.choose(1, now=21.0, lane=1) == "f"
    wiring.set_peers(1, ["c"], now=22.0)  # a peer gone with no spare leaves its lane stalled
    with pytest.raises(NoReplica):
        wiring.choose(1, now=22.0, lane=1)
