"""The peer's attention-cache budget: one pool of tokens shared by all inference sessions.

Used by the inference handler (`swarm.peer.handler`) and announced as free cache tokens.
"""

from __future__ import annotations

import threading

from swarm.errors import CacheFull


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
