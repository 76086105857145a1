"""Expected seconds of an inference step on one peer, fitted online from the steps it served.

Used by the client's router (petals_like.router.SwarmRouter) for step timeouts and probe times.
"""

from __future__ import annotations


class StepLatency:
    """Seconds of a step of n tokens on one peer: fixed + n * per_token, an online fit.

    fixed: the round trip and per-step overhead (first guess: the measured ping).
    per_token: compute seconds per token through the peer's blocks.
    alpha: weight of a new measurement in the moving averages.
    """

    def __init__(self, fixed: float, per_token: float, alpha: float = 0.2):
        self.fixed, self.per_token, self.alpha = fixed, per_token, alpha
        self.measured = False

    def expect(self, n_tokens: int) -> float:
        return self.fixed + n_tokens * self.per_token

    def update(self, seconds: float, n_tokens: int) -> None:
        """Fold in one served step; short steps fit the fixed part, long ones the per-token part."""
        a = self.alpha if self.measured else 1.0
        if n_tokens <= 2:
            self.fixed += a * (seconds - self.fixed)
            self.measured = True
        else:
            per_token = max(0.0, seconds - self.fixed) / n_tokens
            self.per_token += self.alpha * (per_token - self.per_token)
