"""Petals-style block choice and rebalancing over the half-open spans of `SpanRecord`s.

Used by the peer (`--stage auto` and when to move), training peers filling a gap in the stages,
and the churn simulator, whose starting placement fills gaps as those training peers do.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable

from swarm.peer.config import PeerConfig
from swarm.peer.records import SpanRecord

logger = logging.getLogger(__name__)


def _check_blocks(num_blocks: int) -> None:
    if num_blocks <= 0:
        raise ValueError(f"num_blocks must be > 0, got {num_blocks}")


def block_throughputs(spans: Iterable[SpanRecord], num_blocks: int) -> list[float]:
    """Per block, the sum of the throughputs of the joining or online peers that serve it."""
    _check_blocks(num_blocks)
    totals = [0.0] * num_blocks
    for span in spans:
        if not span.serving:
            continue
        for block in range(span.start, min(span.end, num_blocks)):
            totals[block] += span.throughput
    return totals


def block_coverage(spans: Iterable[SpanRecord], num_blocks: int) -> list[int]:
    """Per block, how many joining or online peers serve it (throughput 0 still covers)."""
    _check_blocks(num_blocks)
    counts = [0] * num_blocks
    for span in spans:
        if not span.serving:
            continue
        for block in range(span.start, min(span.end, num_blocks)):
            counts[block] += 1
    return counts


def uncovered_blocks(spans: Iterable[SpanRecord], num_blocks: int) -> list[int]:
    """Blocks that no joining or online peer serves."""
    return [b for b, n in enumerate(block_coverage(spans, num_blocks)) if n == 0]


def swarm_min_throughput(spans: Iterable[SpanRecord], num_blocks: int) -> float:
    """The swarm's bottleneck: the smallest per-block throughput (0.0 if a block is uncovered)."""
    return min(block_throughputs(spans, num_blocks))


def _best_starts(throughputs: list[float], coverage: list[int], span_length: int) -> list[int]:
    """Starts of the best windows: most uncovered blocks first, then the weakest sorted window."""
    best_key: tuple | None = None
    best: list[int] = []
    for start in range(len(throughputs) - span_length + 1):
        window = slice(start, start + span_length)
        uncovered = sum(1 for n in coverage[window] if n == 0)
        key = (-uncovered, sorted(throughputs[window]))
        if best_key is None or key < best_key:
            best_key, best = key, [start]
        elif key == best_key:
            best.append(start)
    if best_key is not None and best_key[0] < 0:
        # Among windows that fill as much of a gap, prefer one flush with the gap's edge: random
        # placement inside a gap leaves slivers that no later peer of this length can fill.
        flush = [s for s in best if _flush_with_gap(coverage, s, s + span_length)]
        best = flush or best
    return best


def _flush_with_gap(coverage: list[int], start: int, end: int) -> bool:
    starts_gap = coverage[start] == 0 and (start == 0 or coverage[start - 1] > 0)
    ends_gap = coverage[end - 1] == 0 and (end == len(coverage) or coverage[end] > 0)
    return starts_gap or ends_gap


def _check_length(num_blocks: int, span_length: int) -> None:
    _check_blocks(num_blocks)
    if not 0 < span_length <= num_blocks:
        raise ValueError(f"span_length must be in 1..{num_blocks}, got {span_length}")


def choose_span(
    spans: Iterable[SpanRecord],
    num_blocks: int,
    span_length: int,
    rng: random.Random | None = None,
) -> tuple[int, int]:
    """The span [start, end) a new peer of `span_length` blocks should serve.

    Uncovered blocks come first (the window covering the most of them); among equals, the window
    whose sorted throughputs are lexicographically smallest (Petals: lift the weakest blocks).
    Ties go to `rng` when given, otherwise to the lowest start.
    """
    _check_length(num_blocks, span_length)
    spans = list(spans)
    starts = _best_starts(
        block_throughputs(spans, num_blocks), block_coverage(spans, num_blocks), span_length
    )
    start = rng.choice(starts) if rng is not None and len(starts) > 1 else starts[0]
    return start, start + span_length


def should_move(
    spans: Iterable[SpanRecord],
    num_blocks: int,
    my_peer_id: str,
    balance_quality: float = PeerConfig.balance_quality,
    rng: random.Random | None = None,
) -> tuple[int, int] | None:
    """The span this peer should move to, or None to stay.

    Simulates the peer leaving and re-choosing a span of the same length. It moves only if the
    new span differs from its own, the move leaves no block uncovered that is covered today, and
    either fewer blocks are uncovered afterwards or the swarm's minimum block throughput rises
    above today's / balance_quality. Each accepted move strictly improves (uncovered count, min
    throughput) by a margin, so peers applying this in turn converge instead of swapping.
    """
    if not 0.0 < balance_quality <= 1.0:
        raise ValueError(f"balance_quality must be in (0, 1], got {balance_quality}")
    spans = list(spans)
    mine = next((s for s in spans if s.peer_id == my_peer_id and s.serving), None)
    if mine is None:
        # Our record may not have reached the DHT yet: never move on a view that lacks us.
        logger.debug("peer %s is not in the view; not moving", my_peer_id)
        return None
    _check_length(num_blocks, mine.length)
    others = [s for s in spans if s is not mine]
    throughputs = block_throughputs(others, num_blocks)
    coverage = block_coverage(others, num_blocks)
    starts = _best_starts(throughputs, coverage, mine.length)
    if mine.start in starts:
        return None  # already in one of the best places: never reload the span we have
    new_start = rng.choice(starts) if rng is not None and len(starts) > 1 else starts[0]
    new_end = new_start + mine.length

    before_cov = block_coverage(spans, num_blocks)
    after_cov = list(coverage)
    after_thr = list(throughputs)
    for block in range(new_start, new_end):
        after_cov[block] += 1
        after_thr[block] += mine.throughput
    if any(before_cov[b] > 0 and after_cov[b] == 0 for b in range(num_blocks)):
        return None  # our leaving would open a hole somewhere
    uncovered_before = sum(1 for n in before_cov if n == 0)
    uncovered_after = sum(1 for n in after_cov if n == 0)
    if uncovered_after < uncovered_before:
        return new_start, new_end
    if uncovered_after > 0:
        return None  # a hole remains either way and we would not shrink it
    min_before = swarm_min_throughput(spans, num_blocks)
    min_after = min(after_thr)
    if min_after > min_before / balance_quality:
        return new_start, new_end
    return None
