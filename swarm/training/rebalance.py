"""Placement of training peers: the run's chain of stages, which stage to join, when to move.

Used by the trainer (`choose_stages`), training peers (join and move) and the churn simulator.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from swarm.errors import NoRoute
from swarm.peer.config import PeerConfig
from swarm.peer.records import SpanRecord


@dataclass(frozen=True)
class StageStats:
    """What a peer knows of one stage.

    demand: work the stage must do, in any unit shared by every stage (samples/s asked of it,
        queued samples, or cost per sample relative to other stages).
    throughput: the summed throughput of its replicas, in demand units per second.
    replicas: how many peers serve it (joining ones included, so movers are counted once).
    """

    demand: float
    throughput: float
    replicas: int

    def __post_init__(self) -> None:
        if self.demand < 0 or self.throughput < 0 or self.replicas < 0:
            raise ValueError(f"stage stats must be >= 0, got {self}")

    @property
    def capacity(self) -> float:
        """Throughput relative to demand: the higher, the more spare the stage has."""
        if self.demand == 0:
            return math.inf
        return self.throughput / self.demand


def least_loaded(stage_stats: Sequence[StageStats]) -> int:
    """Index of the stage with the most spare throughput (lowest index among ties)."""
    if not stage_stats:
        raise ValueError("no stages")
    return max(range(len(stage_stats)), key=lambda s: (stage_stats[s].capacity, -s))


def most_loaded(stage_stats: Sequence[StageStats]) -> int:
    """Index of the bottleneck stage (lowest index among ties)."""
    if not stage_stats:
        raise ValueError("no stages")
    return min(range(len(stage_stats)), key=lambda s: (stage_stats[s].capacity, s))


def choose_join_stage(stage_stats: Sequence[StageStats]) -> int:
    """The stage a newly joining peer should serve: today's bottleneck."""
    return most_loaded(stage_stats)


def _my(my_throughput: float | Sequence[float] | Mapping[int, float], stage: int) -> float:
    if isinstance(my_throughput, (int, float)):
        return float(my_throughput)
    return float(my_throughput[stage])


def choose_move(
    stage_stats: Sequence[StageStats],
    my_stage: int,
    my_throughput: float | Sequence[float] | Mapping[int, float],
    min_gain: float = PeerConfig.min_gain,
) -> int | None:
    """The stage this peer should move to, or None to stay.

    `my_throughput` is this peer's throughput in demand units per second, one number or one per
    stage (a stage's cost may differ). It moves from the least to the most loaded stage only if
    it serves the least loaded one, that stage keeps at least one replica, and after the move the
    stage it left still has more capacity than the bottleneck had, by min_gain times what the
    peer adds there. Each move thus lifts the sorted capacities, so peers never swap back and
    forth. Pure and deterministic.
    """
    if min_gain < 0:
        raise ValueError(f"min_gain must be >= 0, got {min_gain}")
    if not 0 <= my_stage < len(stage_stats):
        raise ValueError(f"my_stage {my_stage} is not one of {len(stage_stats)} stages")
    source, target = least_loaded(stage_stats), most_loaded(stage_stats)
    mine = stage_stats[my_stage]
    if my_stage == target or mine.capacity != stage_stats[source].capacity:
        return None  # only peers of the (possibly tied) least loaded stage move
    if mine.replicas < 2:
        return None  # a stage must keep a replica
    dst = stage_stats[target]
    gained = _my(my_throughput, target)
    if gained <= 0:
        return None
    source_after = StageStats(
        mine.demand, max(mine.throughput - _my(my_throughput, my_stage), 0.0), mine.replicas - 1
    )
    if dst.demand == 0:
        return None  # the bottleneck needs nothing: there is nothing to gain
    if source_after.capacity >= dst.capacity + min_gain * gained / dst.demand:
        return target
    return None


def training_move(
    keys: list[tuple[int, int]],
    speeds: list[float],
    replicas: list[int],
    mine: int,
    my_speed: float,
    min_gain: float = PeerConfig.min_gain,
) -> tuple[int, int] | None:
    """The span a peer of stage `mine` should move to, or None.

    keys: the stages' spans; speeds: their summed measured samples/s (from progress records);
    replicas: peers per stage; my_speed: our samples/s on our own span. Every stage must process
    every sample, so demand is equal; our speed elsewhere scales with the span length.
    """
    if not keys or any(s <= 0 for s in speeds) or my_speed <= 0:
        return None  # not everything measured yet: moving on guesses would thrash
    stats = [
        StageStats(demand=1.0, throughput=s, replicas=n)
        for s, n in zip(speeds, replicas, strict=True)
    ]
    length = keys[mine][1] - keys[mine][0]
    per_stage = [my_speed * length / (e - s) for s, e in keys]
    target = choose_move(stats, mine, per_stage, min_gain)
    return None if target is None else keys[target]


def training_join(
    keys: list[tuple[int, int]], speeds: list[float], replicas: list[int]
) -> tuple[int, int]:
    """The stage a joining training peer serves: the bottleneck.

    With every stage measured (speeds in samples/s, from progress records) that is the slowest
    stage; otherwise the one with the fewest replicas per block (a peer on a longer span is
    slower). Ties go to the earliest stage.
    """
    if not keys or len(keys) != len(speeds) or len(keys) != len(replicas):
        raise ValueError("one speed and one replica count per stage")
    if all(s > 0 for s in speeds):
        stats = [StageStats(1.0, s, n) for s, n in zip(speeds, replicas, strict=True)]
    else:
        stats = [
            StageStats(float(end - start), float(n), n)
            for (start, end), n in zip(keys, replicas, strict=True)
        ]
    return keys[choose_join_stage(stats)]


def choose_stages(
    records: list[SpanRecord], num_layers: int, states: tuple[str, ...] = ("online",)
) -> list[tuple[tuple[int, int], list[str]]]:
    """A chain of spans [0, a), [a, b), ... [z, num_layers) and each span's peers in `states`.

    At each block the span with the most replicas wins (ties: the longer one). Raises NoRoute if
    those peers do not cover the model.
    """
    by_span: dict[tuple[int, int], list[str]] = defaultdict(list)
    for r in records:
        if r.state in states and r.end <= num_layers:
            by_span[(r.start, r.end)].append(r.peer_id)
    chain, pos = [], 0
    while pos < num_layers:
        options = [(k, v) for k, v in by_span.items() if k[0] == pos]
        if not options:
            raise NoRoute(f"no online training peer serves a span starting at block {pos}")
        key, peers = max(options, key=lambda kv: (len(kv[1]), kv[0][1]))
        chain.append((key, sorted(peers)))
        pos = key[1]
    return chain
