"""The peer's memory budgets: attention-cache tokens of sessions, request bytes in flight.

Used by the handlers (`swarm.peer.handler`); free cache tokens are announced on the DHT.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable

from swarm.errors import CacheFull, PeerUnavailable


class CacheBudget:
    """Counts cache tokens (batch * max_length per session); refuses at once when full."""

    def __init__(self, total_tokens: int):
        self.total = total_tokens
        self._used = 0
        self._lock = threading.Lock()

    @property
    def left(self) -> int:
        with self._lock:
            return self.total - self._used

    def allocate(self, tokens: int) -> int:
        """Reserve `tokens`; raises CacheFull naming what is left. Returns the amount reserved."""
        with self._lock:
            if tokens > self.total - self._used:
                raise CacheFull(
                    f"cache full: the session needs {tokens} tokens (batch * max_length), "
                    f"{self.total - self._used} of {self.total} are free; retry later or elsewhere"
                )
            self._used += tokens
        return tokens

    def free(self, tokens: int) -> None:
        with self._lock:
            self._used = max(0, self._used - tokens)


class PeerBusy(PeerUnavailable):
    """The peer holds as many request bytes as it allows: retry later or elsewhere."""


class ByteBudget:
    """Bytes of requests being read or served, summed over all streams and per client;
    refuses when either is full (one client alone can never take it all)."""

    def __init__(self, total_bytes: int, per_client: int | None = None):
        self.total = total_bytes
        self.per_client = per_client if per_client is not None else total_bytes
        self.used = 0
        self._by_client: dict[Hashable, int] = {}
        self._lock = threading.Lock()

    def reserve(self, nbytes: int, client: Hashable = None) -> int:
        """Hold `nbytes` for `client`; raises PeerBusy naming the limit. Returns the amount."""
        with self._lock:
            mine = self._by_client.get(client, 0)
            if mine + nbytes > self.per_client:
                raise PeerBusy(
                    f"peer busy: your requests hold {mine} bytes here and this one {nbytes}; "
                    f"one client may hold {self.per_client} (--request-memory-mb / 2); "
                    "wait for their replies"
                )
            if nbytes > self.total - self.used:
                raise PeerBusy(
                    f"peer busy: a request of {nbytes} bytes would pass the {self.total} bytes "
                    f"of requests this peer holds at once ({self.used} held); retry later"
                )
            self.used += nbytes
            self._by_client[client] = mine + nbytes
        return nbytes

    def release(self, nbytes: int, client: Hashable = None) -> None:
        with self._lock:
            self.used = max(0, self.used - nbytes)
            left = self._by_client.pop(client, 0) - nbytes
            if left > 0:
                self._by_client[client] = left


class Held:
    """What one request of `client` holds of a ByteBudget; `release()` gives it all back."""

    def __init__(self, budget: ByteBudget, client: Hashable = None):
        self.budget, self.client = budget, client
        self.nbytes = 0

    def reserve(self, nbytes: int) -> None:
        self.nbytes += self.budget.reserve(nbytes, self.client)

    def release(self) -> None:
        self.budget.release(self.nbytes, self.client)
        self.nbytes = 0
