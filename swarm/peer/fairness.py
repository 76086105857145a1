"""Per-client shares of a peer: open sessions, cache tokens and requests, by caller peer id.

Used by the handlers (`swarm.peer.handler`); the compute worker (`swarm.peer.worker`) takes
turns between the same keys, so one client can neither fill the peer nor starve the others.
"""

from __future__ import annotations

import contextlib
from collections.abc import Hashable, Iterator
from dataclasses import dataclass

from swarm.errors import CacheFull
from swarm.peer.memory import PeerBusy


@dataclass
class ClientUsage:
    """What one client holds now."""

    sessions: int = 0
    cache_tokens: int = 0
    requests: int = 0  # forwards, backwards and steps queued or running

    @property
    def idle(self) -> bool:
        return not (self.sessions or self.cache_tokens or self.requests)


class ClientLedger:
    """Counts each client's sessions, cache tokens and requests; refuses past its limits.

    max_sessions / max_cache_tokens / max_requests: the most one client holds at once. Used
    from the event loop only (no lock). Clients that hold nothing are forgotten.
    """

    def __init__(self, max_sessions: int, max_cache_tokens: int, max_requests: int):
        self.max_sessions = max_sessions
        self.max_cache_tokens = max_cache_tokens
        self.max_requests = max_requests
        self._usage: dict[Hashable, ClientUsage] = {}

    def usage(self, client: Hashable) -> ClientUsage:
        return self._usage.get(client, ClientUsage())

    def __len__(self) -> int:
        return len(self._usage)

    def open_session(self, client: Hashable, tokens: int, left_after: int) -> None:
        """Count a new session of `tokens` cache tokens; CacheFull naming the limit if over.

        left_after: cache tokens the peer has free once this session holds its own. A client
        may pass its share of the cache while that leaves at least one share free for others:
        a lone client uses most of the peer, and a newcomer still finds room.
        """
        u = self.usage(client)
        if u.sessions >= self.max_sessions:
            raise CacheFull(
                f"client limit: you hold {u.sessions} sessions here, the most one client may "
                f"(--client-sessions {self.max_sessions}); close one or use another peer"
            )
        if u.cache_tokens + tokens > self.max_cache_tokens and left_after < self.max_cache_tokens:
            raise CacheFull(
                f"client limit: your sessions hold {u.cache_tokens} cache tokens and this one "
                f"needs {tokens}; past {self.max_cache_tokens} (--client-cache-share of "
                f"--cache-tokens) one client must leave that many free for others, "
                f"{left_after} would be; close one or use another peer"
            )
        u.sessions += 1
        u.cache_tokens += tokens
        self._usage[client] = u

    def close_session(self, client: Hashable, tokens: int) -> None:
        u = self.usage(client)
        u.sessions = max(0, u.sessions - 1)
        u.cache_tokens = max(0, u.cache_tokens - tokens)
        self._settle(client, u)

    @contextlib.contextmanager
    def request(self, client: Hashable) -> Iterator[None]:
        """Count one request while it is queued or runs; PeerBusy naming the limit if over."""
        u = self.usage(client)
        if u.requests >= self.max_requests:
            raise PeerBusy(
                f"client limit: you have {u.requests} requests queued or running here, the most "
                f"one client may (--client-requests {self.max_requests}); wait for their replies"
            )
        u.requests += 1
        self._usage[client] = u
        try:
            yield
        finally:
            u.requests -= 1
            self._settle(client, u)

    def _settle(self, client: Hashable, u: ClientUsage) -> None:
        if u.idle:
            self._usage.pop(client, None)
        else:
            self._usage[client] = u
