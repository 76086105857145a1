"""A minimal discrete-event engine: a heap of (time, seq, kind, a, b) tuples in virtual time.

Used by the churn simulator's strategies; seq makes equal-time events run in push order.
"""

from __future__ import annotations

import heapq


class EventQueue:
    """Events are plain tuples so a million of them cost no object allocation beyond the tuple."""

    __slots__ = ("heap", "seq", "now")

    def __init__(self) -> None:
        self.heap: list[tuple[float, int, int, int, int]] = []
        self.seq = 0
        self.now = 0.0

    def push(self, time: float, kind: int, a: int = 0, b: int = 0) -> None:
        """Schedule event `kind` with two integer arguments at virtual `time` (>= now; unchecked,
        this is the hot path: callers only ever add non-negative delays to now)."""
        self.seq += 1
        heapq.heappush(self.heap, (time, self.seq, kind, a, b))

    def pop(self) -> tuple[float, int, int, int, int]:
        """The next event; advances `now` to its time."""
        event = heapq.heappop(self.heap)
        self.now = event[0]
        return event

    def __len__(self) -> int:
        return len(self.heap)

    def run(self, handlers: dict, until: float) -> int:
        """Dispatch events to handlers[kind](time, a, b) until the queue empties or passes `until`.

        Returns the number of events handled; `now` ends at `until` unless the queue ran dry.
        """
        heap, pop = self.heap, heapq.heappop
        table = [handlers.get(k) for k in range(max(handlers) + 1)]
        count = 0
        while heap and heap[0][0] <= until:
            time, _, kind, a, b = pop(heap)
            self.now = time
            table[kind](time, a, b)
            count += 1
        self.now = max(self.now, until) if heap else self.now
        return count
