"""Output verification: a fraction of hop steps re-run on another replica of the span and compared.

Used by RemoteInferenceSession (petals_like.session) when a client asks for `verify=F`.

How a check works: the hop's kept inputs of positions [0, end) go by a plain, cache-less forward
to another peer serving the same blocks (`rpc_forward`), and its outputs are compared with what
the hop's peer returned for every position so far, not only the last step's: one check covers
all unchecked steps before it. Checks run in the background while the next steps go on;
generate() passes tokens on once the positions they came from are checked, and ends with one
last check. Why a plain forward rather than a shadow session per hop fed lazily: it holds no
cache on the checker (a shadow holds a second session-long cache per hop, checked or not), needs
no state to repair when a checker fails or lies, and a check is one round trip from any replica.
Its price is compute: a check runs the whole prefix, so the checkers do about F * N * L / 2
position-blocks over N tokens of context L, where a shadow does N. On a GPU, where a forward of
a few hundred positions costs about one decoding step, that is cheap; on CPUs shared with the
route (simulations/bench_verify.py on a 2-core box) it is most of the measured cost, and long
contexts on CPUs would be better served by shadows (not built).

A mismatch is settled by a third replica: whoever disagrees with it lied, is banned for
LIAR_BAN seconds and reported (`Liar`); when the liar was on the route, the session rolls back to
the first position where its outputs went wrong (`RolledBack`) and generation goes on from there.

Tolerance (TOLERANCE): relative L2 error per position, the worst row. Both peers get the same
encoded inputs (encoding is deterministic); they differ by their replies' codec error, by their
weights' quantization and, with int8 weights, by the batch shape: a step of one token takes the
weight-only path, a forward of the whole prefix the LLM.int8() path, whose outlier columns
depend on every row. Measured: tiny test model (hidden 64), one reply through int8-block64 at
most 0.9%, dynamic8-block64 1.3%, int8 against fp32 weights 3.4%; SmolLM2-135M int8 with
int8-block64 replies, stepped session against one forward of the prefix, 5.8% to 12% (blocks
0:15 and 15:30, 32 and 128 positions). 0.25 is twice the worst honest case; an echoing peer is
off by 64% to 100%. A liar that perturbs its outputs by less than that is not caught: its harm is
bounded by twice what honest int8 replicas already differ by.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from petals_like.routing import Hop
from swarm.errors import PeerTimeout

logger = logging.getLogger(__name__)

# 0.1: simulations/bench_verify.py (SmolLM2 int8, two replicas of 0:15 and 15:30, 32 tokens, a
# 2-core box at load 9-14) measured a median cost of 2% at 0.1 and 22-30% at 0.2 (61% at 1),
# against the goal of 15%. The fraction sets how soon a liar is caught (about 1/F steps), not
# whether: every generation ends with a check of every position, so its text is honest wherever
# a second replica exists.
DEFAULT_FRACTION = 0.1
TOLERANCE = 0.25
LIAR_BAN = 3600.0  # seconds: a peer caught lying does not come back within a session
SLOW_CHECKER_COOLDOWN = 30.0  # seconds a checker that timed out is asked only when no other is


class RolledBack(Exception):
    """The session went back to `position`: a liar's outputs were used from there on.

    Not an error: generate() catches it, drops the tokens sampled from position on and goes on.
    """

    def __init__(self, position: int, liar: Liar):
        super().__init__(f"rolled back to position {position}: {liar.summary()}")
        self.position, self.liar = position, liar


@dataclass
class Liar:
    """A peer whose outputs a third replica contradicted."""

    peer_id: Any
    blocks: tuple[int, int]
    position: int  # the first position where its outputs were wrong
    error: float  # relative L2 error there against the honest replicas
    witnesses: tuple[Any, ...]  # the replicas that agreed with each other
    on_route: bool  # it served our session (else: it lied as a checker)

    def summary(self) -> str:
        role = "served" if self.on_route else "checked"
        return (
            f"peer ...{str(self.peer_id)[-6:]} lied on blocks {self.blocks[0]}:{self.blocks[1]} it "
            f"{role} (relative error {self.error:.2f} from position {self.position}; "
            f"witnesses {', '.join('...' + str(w)[-6:] for w in self.witnesses)}); banned"
        )


class VerifyRouter(Protocol):
    """What verification needs from the router (petals_like.router.SwarmRouter)."""

    def replicas(self, start: int, end: int, exclude: set) -> list[Any]: ...

    async def forward(
        self, peer_id: Any, hidden: torch.Tensor, start: int, end: int, timeout: float, adapter: Any
    ) -> torch.Tensor: ...

    def ban_liar(self, peer_id: Any, reason: str, period: float) -> None: ...

    def step_timeout(self, peer_id: Any, n_tokens: int) -> float: ...

    def report_failure(self, peer_id: Any, error: BaseException) -> None: ...


def relative_errors(got: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """[T] relative L2 error per position of [B, T, H] `got` against `ref`, the worst row."""
    diff = (got.float() - ref.float()).norm(dim=-1)
    return (diff / ref.float().norm(dim=-1).clamp_min(1e-6)).amax(dim=0)


def first_mismatch(got: torch.Tensor, ref: torch.Tensor, tolerance: float) -> int | None:
    """The first position whose relative error exceeds `tolerance` (NaN counts), or None."""
    err = relative_errors(got, ref)
    bad = (err > tolerance) | ~torch.isfinite(err)
    if not bool(bad.any()):
        return None
    return int(bad.nonzero()[0, 0])


class Verifier:
    """Decides which steps are checked, runs the checks, bans and records liars.

    fraction: share of steps whose every hop is checked (0 < fraction <= 1).
    tolerance: relative L2 error per position that honest replicas stay within.
    seed: of the choice of steps and checkers (default: random, so a liar cannot predict them).
    """

    def __init__(
        self, fraction: float, tolerance: float = TOLERANCE, seed: int | None = None
    ) -> None:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"verify must be a fraction in (0, 1], got {fraction}")
        self.fraction, self.tolerance = fraction, tolerance
        self.rng = random.Random(seed)
        self.checks = 0  # hop checks run
        self.liars: list[Liar] = []
        self.unverifiable: set[tuple[int, int]] = set()  # spans with no second replica
        self.unsettled: list[str] = []  # disagreements no third replica could settle
        self.slow: dict[Any, float] = {}  # checker -> time.monotonic() until which others go first

    def no_replica(self, span: tuple[int, int]) -> None:
        """Say (once, at INFO: the CLI's summary line says it too) that blocks `span` cannot
        be checked: nobody else serves them, as in any swarm of one replica per span."""
        if span not in self.unverifiable:
            self.unverifiable.add(span)
            logger.info(
                "verification impossible for blocks %d:%d: no other replica serves them", *span
            )

    def due(self) -> bool:
        return self.fraction >= 1.0 or self.rng.random() < self.fraction

    async def check(
        self,
        router: VerifyRouter,
        hop: Hop,
        inputs: torch.Tensor,
        outputs: torch.Tensor,
        adapter: Any = None,
    ) -> Liar | None:
        """Check `outputs` [B, T, H] of `hop` for `inputs` from position 0 on other replicas.

        Returns the Liar when the hop's own peer lied (banned already); a lying checker is banned
        and recorded too, but returns None (the hop was right).
        """
        span = (hop.start, hop.end)
        tried = {hop.peer_id}
        first = await self._reference(router, hop, inputs, tried, adapter)
        if first is None:
            self.no_replica(span)
            return None
        self.unverifiable.discard(span)  # a replica came
        self.checks += 1
        checker, ref = first
        if first_mismatch(outputs, ref, self.tolerance) is None:
            return None
        # They disagree: a third replica says who is right.
        third = await self._reference(router, hop, inputs, tried, adapter)
        if third is None:
            msg = (
                f"peers ...{str(hop.peer_id)[-6:]} and ...{str(checker)[-6:]} disagree on blocks "
                f"{hop.start}:{hop.end} and no third replica can settle it"
            )
            logger.warning("verification: %s", msg)
            self.unsettled.append(msg)
            return None
        judge, ref3 = third
        hop_ok = first_mismatch(outputs, ref3, self.tolerance) is None
        checker_ok = first_mismatch(ref, ref3, self.tolerance) is None
        if hop_ok == checker_ok:  # all three differ (or, oddly, the judge agrees with both)
            msg = f"three replicas of blocks {hop.start}:{hop.end} disagree; nobody is banned"
            logger.warning("verification: %s", msg)
            self.unsettled.append(msg)
            return None
        liar_id, lie, honest = (checker, ref, ref3) if hop_ok else (hop.peer_id, outputs, ref3)
        position = first_mismatch(lie, honest, self.tolerance)
        liar = Liar(
            peer_id=liar_id,
            blocks=span,
            position=position,
            error=float(relative_errors(lie, honest)[position]),
            witnesses=(judge, hop.peer_id if hop_ok else checker),
            on_route=not hop_ok,
        )
        self.liars.append(liar)
        logger.warning("verification: %s", liar.summary())
        router.ban_liar(liar_id, f"(lied on blocks {hop.start}:{hop.end})", LIAR_BAN)
        return None if hop_ok else liar

    async def _reference(
        self, router: VerifyRouter, hop: Hop, inputs: torch.Tensor, tried: set, adapter: Any
    ) -> tuple[Any, torch.Tensor] | None:
        """(peer, outputs) of another replica not in `tried` (added to it); None if none answers."""
        while True:
            candidates = router.replicas(hop.start, hop.end, tried)
            if not candidates:
                return None
            now = time.monotonic()
            # A checker that just timed out would likely time out again: others go first.
            cool = [c for c in candidates if self.slow.get(c, 0.0) <= now]
            peer = self.rng.choice(cool or candidates)
            tried.add(peer)
            try:
                # The bound of a step of that many tokens on that peer (checks are steps too).
                timeout = router.step_timeout(peer, inputs.shape[0] * inputs.shape[1])
                out = await router.forward(peer, inputs, hop.start, hop.end, timeout, adapter)
            except (asyncio.CancelledError, KeyboardInterrupt):
                raise
            except (PeerTimeout, asyncio.TimeoutError) as e:
                # Slow is not gone: a forward of the whole prefix on a busy replica can outlast a
                # step's bound. Banning it took every 3:6 replica out of a CI run's routes.
                logger.info("checker %s too slow on blocks %d:%d: %r", peer, hop.start, hop.end, e)
                self.slow[peer] = time.monotonic() + SLOW_CHECKER_COOLDOWN
                continue
            except Exception as e:  # a checker that fails is a failed peer, not a verdict
                logger.info("checker %s failed on blocks %d:%d: %r", peer, hop.start, hop.end, e)
                router.report_failure(peer, e)
                continue
            if out.shape != inputs.shape:
                router.ban_liar(peer, f"(answered shape {tuple(out.shape)})", LIAR_BAN)
                continue
            return peer, out
