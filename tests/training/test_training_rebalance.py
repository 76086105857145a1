"""When a training peer leaves its stage for the bottleneck (the peer's use of choose_move).

Stages have equal demand; a peer's speed on another span scales with the span's length.
"""

from swarm.training.rebalance import training_join, training_move

KEYS = [(0, 3), (3, 6)]


def test_moves_from_spare_stage_to_bottleneck():
    # Stage 0 has three replicas doing 30 samples/s, stage 1 one doing 5.
    assert training_move(KEYS, [30.0, 5.0], [3, 1], mine=0, my_speed=10.0) == (3, 6)


def test_stays_when_balanced_or_alone_or_unmeasured():
    assert training_move(KEYS, [10.0, 10.0], [2, 2], mine=0, my_speed=5.0) is None
    assert training_move(KEYS, [30.0, 5.0], [1, 1], mine=0, my_speed=30.0) is None
    assert training_move(KEYS, [30.0, 0.0], [3, 1], mine=0, my_speed=10.0) is None
    assert training_move(KEYS, [30.0, 5.0], [3, 1], mine=1, my_speed=5.0) is None


def test_span_length_scales_the_gain():
    keys = [(0, 4), (4, 6)]
    # Our 4-block speed of 4 samples/s is 8 samples/s on the 2-block stage.
    assert training_move(keys, [20.0, 6.0], [4, 1], mine=0, my_speed=4.0) == (4, 6)


def test_joins_the_slowest_stage_or_the_thinnest_while_unmeasured():
    assert training_join(KEYS, [30.0, 5.0], [3, 1]) == (3, 6)
    assert training_join(KEYS, [5.0, 30.0], [1, 3]) == (0, 3)
    # Measured speed wins over replica counts: two slow replicas are still the bottleneck.
    assert training_join(KEYS, [4.0, 9.0], [2, 1]) == (0, 3)
    # Unmeasured: replicas per block; a 4-block stage with 2 replicas is thinner than 2 on 2.
    assert training_join(KEYS, [0.0, 9.0], [2, 1]) == (3, 6)
    assert training_join([(0, 4), (4, 6)], [0.0, 0.0], [2, 2]) == (0, 4)
    assert training_join(KEYS, [0.0, 0.0], [1, 1]) == (0, 3)
