"""Tests of the Petals-style block balancer: span choice, hysteresis, recovery from departures.

Run by pytest; the peer and the churn simulator rely on these guarantees.
"""

import random

import pytest

from swarm.peer.balancer import (
    block_coverage,
    block_throughputs,
    choose_span,
    should_move,
    swarm_min_throughput,
    uncovered_blocks,
)
from swarm.peer.records import SpanRecord


def rec(peer_id: str, start: int, end: int, throughput: float, state: str = "online"):
    """A peer's span record with only what the balancer reads."""
    return SpanRecord(peer_id, start, end, state=state, throughput=throughput)


def test_block_throughputs_sum_serving_peers_only():
    spans = [
        rec("a", 0, 3, 1.0),
        rec("b", 2, 5, 2.0, state="joining"),
        rec("c", 0, 5, 9.0, state="offline"),
    ]
    assert block_throughputs(spans, 5) == [1.0, 1.0, 3.0, 2.0, 2.0]
    assert swarm_min_throughput(spans, 5) == 1.0
    assert uncovered_blocks([rec("a", 1, 3, 1.0)], 5) == [0, 3, 4]


def test_span_records_reject_bad_values():
    with pytest.raises(ValueError):
        rec("a", 3, 3, 1.0)
    with pytest.raises(ValueError):
        rec("a", 0, 3, -1.0)
    with pytest.raises(ValueError):
        rec("a", 0, 3, 1.0, state="weird")


def test_choose_span_prefers_uncovered_then_weakest():
    assert choose_span([], 10, 4) == (0, 4)
    spans = [rec("a", 0, 4, 5.0), rec("b", 4, 8, 1.0)]
    assert choose_span(spans, 10, 2) == (8, 10)  # the only uncovered blocks
    spans = [rec("a", 0, 5, 5.0), rec("b", 5, 10, 1.0)]
    assert choose_span(spans, 10, 5) == (5, 10)  # the weaker half
    spans = [rec("a", 0, 10, 1.0), rec("b", 0, 5, 1.0)]
    assert choose_span(spans, 10, 3) == (5, 8)  # lowest start among the weakest windows


def test_choose_span_ties_are_random_but_seeded():
    spans = [rec("a", 0, 10, 1.0)]
    picks = {choose_span(spans, 10, 2, random.Random(seed)) for seed in range(30)}
    assert len(picks) > 3
    assert choose_span(spans, 10, 2, random.Random(7)) == choose_span(
        spans, 10, 2, random.Random(7)
    )


def test_choose_span_rejects_bad_length():
    with pytest.raises(ValueError):
        choose_span([], 10, 11)
    with pytest.raises(ValueError):
        choose_span([], 10, 0)


def test_no_move_when_already_best_or_absent():
    spans = [rec("a", 0, 5, 1.0), rec("b", 5, 10, 1.0)]
    assert should_move(spans, 10, "a") is None
    assert should_move(spans, 10, "zzz") is None


def test_never_opens_a_hole():
    # b is the only server of 5..9; moving it to the doubly covered 0..4 would uncover them.
    spans = [rec("a", 0, 5, 1.0), rec("a2", 0, 5, 1.0), rec("b", 5, 10, 0.1)]
    assert should_move(spans, 10, "b") is None


def test_departed_peer_blocks_are_recovered():
    spans = [
        rec("a", 0, 4, 1.0),
        rec("b", 4, 8, 1.0),
        rec("c", 8, 12, 1.0, state="offline"),  # c left
        rec("d", 0, 4, 1.0),
    ]
    assert uncovered_blocks(spans, 12) == [8, 9, 10, 11]
    assert should_move(spans, 12, "a") in (None, (8, 12))
    assert should_move(spans, 12, "b") is None  # it is the only server of 4..7
    moved = should_move(spans, 12, "d")
    assert moved == (8, 12)
    spans[3] = rec("d", *moved, 1.0)
    assert uncovered_blocks(spans, 12) == []


def test_small_gain_is_not_worth_a_move():
    # Moving c from 0..5 to 5..10 lifts the minimum from 2.0 to 2.2: under the 1/0.75 margin.
    spans = [rec("a", 0, 5, 3.0), rec("b", 5, 10, 2.0), rec("c", 0, 5, 0.2)]
    assert swarm_min_throughput(spans, 10) == 2.0
    assert should_move(spans, 10, "c") is None
    # With balance_quality 1.0 any strict gain moves.
    assert should_move(spans, 10, "c", balance_quality=1.0) == (5, 10)


def test_big_gain_moves():
    spans = [rec("a", 0, 5, 1.0), rec("b", 5, 10, 1.0), rec("c", 0, 5, 5.0)]
    # c leaves 0..5 at 1.0 either way, so the minimum stays 1.0: no move.
    assert should_move(spans, 10, "c") is None
    spans = [rec("a", 0, 5, 4.0), rec("b", 5, 10, 1.0), rec("c", 0, 5, 5.0)]
    assert should_move(spans, 10, "c") == (5, 10)  # min 1.0 -> 4.0


def _run_until_stable(spans, num_blocks, rng, max_rounds=50):
    """Peers apply should_move in turn; returns (rounds, moves) once a full round moves nobody."""
    moves = 0
    for rounds in range(1, max_rounds + 1):
        moved_this_round = False
        for i in range(len(spans)):
            target = should_move(spans, num_blocks, spans[i].peer_id, rng=rng)
            if target is not None:
                assert target != (spans[i].start, spans[i].end)
                spans[i] = rec(spans[i].peer_id, *target, spans[i].throughput)
                moves += 1
                moved_this_round = True
        if not moved_this_round:
            return rounds, moves
    raise AssertionError("peers kept moving: ping-pong")


def test_two_peers_alternating_converge_and_stop():
    # Both start on the same half; one should move to the empty half, then both stay put.
    spans = [rec("a", 0, 5, 1.0), rec("b", 0, 5, 1.0)]
    rounds, moves = _run_until_stable(spans, 10, random.Random(0))
    assert moves == 1 and rounds == 2
    assert sorted((s.start, s.end) for s in spans) == [(0, 5), (5, 10)]
    for _ in range(10):  # applying it again never moves anyone back
        assert should_move(spans, 10, "a") is None and should_move(spans, 10, "b") is None


@pytest.mark.parametrize("seed", range(20))
def test_random_swarms_converge_without_losing_coverage(seed):
    rng = random.Random(seed)
    num_blocks = rng.randint(4, 24)
    spans = []
    for i in range(rng.randint(2, 12)):
        length = rng.randint(1, num_blocks)
        start = rng.randint(0, num_blocks - length)
        spans.append(rec(f"p{i}", start, start + length, rng.uniform(0.1, 10.0)))
    holes_before = len(uncovered_blocks(spans, num_blocks))
    min_before = swarm_min_throughput(spans, num_blocks)
    _run_until_stable(spans, num_blocks, rng)
    assert len(uncovered_blocks(spans, num_blocks)) <= holes_before
    if holes_before == 0:
        assert swarm_min_throughput(spans, num_blocks) >= min_before


def test_peers_joining_one_by_one_tile_the_model_without_slivers():
    # 30 blocks, spans of 10: three peers must cover everything, whatever the random tie-breaks.
    for seed in range(50):
        rng = random.Random(seed)
        spans: list[SpanRecord] = []
        for i in range(3):
            start, end = choose_span(spans, 30, 10, rng)
            spans.append(rec(f"p{i}", start, end, 1.0))
        assert min(block_coverage(spans, 30)) == 1, (seed, spans)
