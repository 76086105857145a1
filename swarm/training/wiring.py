"""SWARM stochastic wiring: which replica of a stage gets the next microbatch.

Used by the trainer (with wall-clock time) and by the churn simulator (with virtual time).
"""

from __future__ import annotations

import heapq
import logging
import random
from collections.abc import Iterable
from dataclasses import dataclass, field

from swarm.errors import NoRoute

logger = logging.getLogger(__name__)

# SWARM weighs a backward task as 2.5 forward ones (recomputed forward + gradients).
BACKWARD_TASK_FACTOR = 2.5
EMA_ALPHA = 0.1


class NoReplica(NoRoute):
    """A stage has no replica the trainer may call now (none known, or all banned)."""


class ThroughputEMA:
    """Bias-corrected moving average of seconds per sample, read as samples per second."""

    __slots__ = ("alpha", "num_updates", "_seconds_per_sample", "samples_per_second")

    def __init__(self, alpha: float = EMA_ALPHA) -> None:
        self.alpha = alpha
        self.num_updates = 0
        self._seconds_per_sample = 0.0
        self.samples_per_second = 0.0  # 0.0 until the first update

    def update(self, task_size: float, elapsed_s: float) -> float:
        self._seconds_per_sample = (
            self.alpha * elapsed_s / task_size + (1 - self.alpha) * self._seconds_per_sample
        )
        self.num_updates += 1
        # Dividing by 1 - (1 - alpha)^n removes the pull towards the initial 0.
        corrected = self._seconds_per_sample / (1 - (1 - self.alpha) ** self.num_updates)
        self.samples_per_second = 1.0 / max(corrected, 1e-12)
        return self.samples_per_second


@dataclass
class _Stage:
    heap: list = field(default_factory=list)  # [virtual_time, tiebreak, peer_id]; stale skipped
    entries: dict = field(default_factory=dict)  # peer_id -> its live heap entry
    members: set = field(default_factory=set)  # every known peer, banned ones included
    banned_until: dict = field(default_factory=dict)  # peer_id -> time its ban ends


class StochasticWiring:
    """Per-stage min-heaps of (virtual time, random tiebreak, peer), as SWARM's load balancer.

    `choose` takes the peer with the smallest virtual time and pushes it back by the expected
    duration of the task (task_size / its throughput), so over time each replica gets work in
    proportion to its measured throughput. Time (`now`) is always passed in.
    """

    def __init__(self, rng: random.Random, default_throughput: float = 1.0) -> None:
        self._rng = rng
        # Used to push back peers that nobody in their stage has measured yet.
        self._default_throughput = default_throughput
        self._stages: dict[int, _Stage] = {}
        self._stage_of: dict[str, int] = {}
        self._ema: dict[str, ThroughputEMA] = {}

    # Membership

    def set_peers(self, stage: int, peer_ids: Iterable[str], now: float = 0.0) -> None:
        """Sync one stage with the DHT's view: new peers join at the front, gone peers leave."""
        st = self._stages.setdefault(stage, _Stage())
        wanted = set(peer_ids)
        for peer_id in st.members - wanted:
            self._forget(peer_id)
        for peer_id in sorted(wanted - st.members):  # sorted: same rng draws every run
            if peer_id in self._stage_of:
                self._forget(peer_id)  # it moved here from another stage
            self._stage_of[peer_id] = stage
            st.members.add(peer_id)
            self._ema[peer_id] = ThroughputEMA()
            self._push(st, peer_id, self._front(st))

    def peers(self, stage: int) -> list[str]:
        """Peers of a stage the wiring knows, banned ones included."""
        st = self._stages.get(stage)
        return sorted(st.members) if st is not None else []

    def _forget(self, peer_id: str) -> None:
        stage = self._stage_of.pop(peer_id, None)
        if stage is not None:
            st = self._stages[stage]
            st.entries.pop(peer_id, None)
            st.members.discard(peer_id)
            st.banned_until.pop(peer_id, None)
        self._ema.pop(peer_id, None)

    # Choice

    def choose(self, stage: int, now: float, task_size: float = 1.0, lane: int = 0) -> str:
        """The replica of `stage` to send a task of `task_size` samples to (`lane` is unused:
        stochastic wiring routes every microbatch anew).

        Raises NoReplica when the stage has no peer that is not banned at `now`.
        """
        if task_size <= 0:
            raise ValueError(f"task_size must be > 0, got {task_size}")
        st = self._stages.get(stage)
        if st is None or not st.members:
            raise NoReplica(f"stage {stage} has no known replica")
        if st.banned_until:
            self._unban_expired(st, now)
        # Bounded: every iteration removes one heap entry, live or stale.
        while st.heap:
            entry = heapq.heappop(st.heap)
            virtual_time, _, peer_id = entry
            if st.entries.get(peer_id) is not entry:
                continue  # stale: peer left, was banned, or was pushed back since
            ema = self._ema[peer_id]
            if ema.num_updates:
                speed = ema.samples_per_second
            else:
                speed = self._stage_speed(st)
            self._push(st, peer_id, virtual_time + task_size / speed)
            return peer_id
        raise NoReplica(f"every replica of stage {stage} is banned at t={now:.1f}")

    def _front(self, st: _Stage) -> float:
        """Virtual time at the front of a stage's heap (0.0 if it is empty)."""
        while st.heap and st.entries.get(st.heap[0][2]) is not st.heap[0]:
            heapq.heappop(st.heap)
        return st.heap[0][0] if st.heap else 0.0

    def _push(self, st: _Stage, peer_id: str, virtual_time: float) -> None:
        entry = [virtual_time, self._rng.random(), peer_id]
        st.entries[peer_id] = entry
        heapq.heappush(st.heap, entry)

    def _stage_speed(self, st: _Stage) -> float:
        """Mean measured throughput of a stage, standing in for its unmeasured peers."""
        speeds = [self._ema[p].samples_per_second for p in st.members if self._ema[p].num_updates]
        return sum(speeds) / len(speeds) if speeds else self._default_throughput

    # Feedback

    def report_success(self, peer_id: str, task_size: float, elapsed_s: float) -> None:
        """A call to `peer_id` of `task_size` samples took `elapsed_s` seconds (wall or virtual)."""
        if task_size <= 0:
            raise ValueError(f"task_size must be > 0, got {task_size}")
        ema = self._ema.get(peer_id)
        if ema is None:
            return  # the peer left the view while the call was in flight
        ema.update(task_size, max(elapsed_s, 1e-9))

    def report_failure(self, peer_id: str, now: float, ban_s: float) -> None:
        """Ban `peer_id` until now + ban_s; it comes back unmeasured, at the front of its stage."""
        stage = self._stage_of.get(peer_id)
        if stage is None:
            return
        st = self._stages[stage]
        st.banned_until[peer_id] = now + ban_s
        st.entries.pop(peer_id, None)
        self._ema[peer_id] = ThroughputEMA()

    def is_banned(self, peer_id: str, now: float) -> bool:
        stage = self._stage_of.get(peer_id)
        if stage is None:
            return False
        return self._stages[stage].banned_until.get(peer_id, float("-inf")) > now

    def throughput(self, peer_id: str) -> float | None:
        """Measured samples/s of a peer, or None if unmeasured or unknown."""
        ema = self._ema.get(peer_id)
        return ema.samples_per_second if ema is not None and ema.num_updates else None

    def _unban_expired(self, st: _Stage, now: float) -> None:
        expired = sorted(p for p, until in st.banned_until.items() if until <= now)
        for peer_id in expired:
            del st.banned_until[peer_id]
            self._push(st, peer_id, self._front(st))


class FixedWiring:
    """Fixed pipelines: lane i of every stage is always the same peer (the baseline SWARM beats).

    Each stage keeps a list of slots; microbatch lanes map onto them. A peer that leaves or is
    banned keeps its slot empty until a newcomer (its replacement) takes it, so a lane stalls
    while its peer is down, as a fixed pipeline does. Same interface as StochasticWiring.
    """

    def __init__(self, pipelines: int) -> None:
        if pipelines <= 0:
            raise ValueError(f"pipelines must be positive, got {pipelines}")
        self.pipelines = pipelines
        self._slots: dict[int, list[str | None]] = {}
        self._banned_until: dict[str, float] = {}

    def set_peers(self, stage: int, peer_ids: Iterable[str], now: float = 0.0) -> None:
        """Keep each stage's `pipelines` slots: gone peers leave holes, newcomers fill them
        (or replace a banned peer); peers beyond the slots are spares."""
        slots = self._slots.setdefault(stage, [None] * self.pipelines)
        wanted = sorted(peer_ids)
        for i, peer in enumerate(slots):
            if peer not in wanted:
                slots[i] = None
        newcomers = [p for p in wanted if p not in slots]
        for i, peer in enumerate(slots):
            if newcomers and (peer is None or self.is_banned(peer, now)):
                slots[i] = newcomers.pop(0)

    def choose(self, stage: int, now: float, task_size: float = 1.0, lane: int = 0) -> str:
        slots = self._slots.get(stage) or []
        if not slots:
            raise NoReplica(f"stage {stage} has no known replica")
        peer = slots[lane % self.pipelines]
        if peer is None or self.is_banned(peer, now):
            raise NoReplica(f"the peer of lane {lane} at stage {stage} is down")
        return peer

    def report_success(self, peer_id: str, task_size: float, elapsed_s: float) -> None:
        """Fixed lanes do not adapt to speed."""

    def report_failure(self, peer_id: str, now: float, ban_s: float) -> None:
        self._banned_until[peer_id] = now + ban_s

    def is_banned(self, peer_id: str, now: float) -> bool:
        return self._banned_until.get(peer_id, float("-inf")) > now
