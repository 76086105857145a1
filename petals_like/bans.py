"""Temporary bans of peers that failed, each period longer than the last.

Used by the client's router: a banned peer is never dialled again until its ban runs out, even
while its DHT record still looks alive (a SIGKILLed peer's record lives on for two periods).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass
class _Ban:
    until: float
    strikes: int


class BanList:
    """Bans with growing periods: base, base*growth, base*growth^2, ... up to max_period.

    base_period: seconds of the first ban of a peer.
    growth: factor applied to the period at every further failure.
    max_period: the longest ban.
    clock: monotonic time source (injected by tests).
    """

    def __init__(
        self,
        base_period: float = 15.0,
        growth: float = 2.0,
        max_period: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        if base_period <= 0 or growth < 1 or max_period < base_period:
            raise ValueError("need base_period > 0, growth >= 1 and max_period >= base_period")
        self.base_period, self.growth, self.max_period = base_period, growth, max_period
        self._clock = clock
        self._bans: dict[Hashable, _Ban] = {}

    def ban(self, peer: Hashable, reason: str = "", period: float | None = None) -> float:
        """Ban `peer` (again); return the period in seconds.

        period: this ban's length instead of the growing one (a peer caught lying), never
            shorter than a ban it already serves.
        """
        now = self._clock()
        prev = self._bans.get(peer)
        strikes = prev.strikes + 1 if prev is not None else 1
        if period is None:
            period = min(self.max_period, self.base_period * self.growth ** (strikes - 1))
        elif prev is not None:
            period = max(period, prev.until - now)
        self._bans[peer] = _Ban(until=now + period, strikes=strikes)
        logger.info("banned peer %s for %.1f s (strike %d) %s", peer, period, strikes, reason)
        return period

    def is_banned(self, peer: Hashable) -> bool:
        ban = self._bans.get(peer)
        return ban is not None and self._clock() < ban.until

    def banned(self) -> set[Hashable]:
        """Peers whose ban is running now."""
        now = self._clock()
        return {peer for peer, ban in self._bans.items() if now < ban.until}

    def strikes(self, peer: Hashable) -> int:
        ban = self._bans.get(peer)
        return 0 if ban is None else ban.strikes

    def forgive(self, peer: Hashable) -> None:
        """A peer that served a request after its ban ran out starts again from the base period."""
        ban = self._bans.get(peer)
        if ban is not None and self._clock() >= ban.until:
            del self._bans[peer]

    def lift(self, peer: Hashable) -> None:
        """End a running ban early (the peer proved alive); until it serves a request again, its
        strikes stay, so a relapse is banned for longer."""
        ban = self._bans.get(peer)
        if ban is not None:
            ban.until = min(ban.until, self._clock())

    def __contains__(self, peer: Hashable) -> bool:
        return self.is_banned(peer)
