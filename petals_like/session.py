"""An inference session through a chain of peers that survives their loss by replaying inputs.

Used by DistributedModelForCausalLM (generate, chat sessions) and the tests of failover.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from petals_like.probing import is_peer_failure
from petals_like.push_steps import PushSteps
from petals_like.routing import Hop, describe
from petals_like.verify import Liar, RolledBack, Verifier
from swarm.errors import BadRequest, PeerUnavailable
from swarm.loops import within

logger = logging.getLogger(__name__)


class StepStream(Protocol):
    """One peer's side of a session: `swarm.peer.client.InferenceStream` or a test double."""

    async def step(self, hidden: torch.Tensor, position: int, timeout: float) -> torch.Tensor: ...

    async def close(self) -> None: ...


class SessionRouter(Protocol):
    """What a session needs from the router (petals_like.router.SwarmRouter)."""

    num_blocks: int

    async def route(self, start: int, end: int, cache_tokens_needed: int) -> list[Hop]: ...

    async def open(
        self, hop: Hop, max_length: int, batch_size: int, adapter: Any = None
    ) -> StepStream: ...

    open_timeout: float

    def step_timeout(self, peer_id: Any, n_tokens: int) -> float: ...

    def probe_after(self, peer_id: Any, n_tokens: int) -> float: ...

    async def guarded(self, peer_id: Any, work: Any, timeout: float, probe_after: float) -> Any: ...

    def report_success(self, peer_id: Any, seconds: float, n_tokens: int) -> None: ...

    def report_failure(self, peer_id: Any, error: BaseException) -> None: ...

    def replicas(self, start: int, end: int, exclude: set) -> list[Any]: ...


@dataclass
class Failover:
    """One recovery: which peer failed, why, which blocks were re-routed, and how long it took."""

    peer_id: Any
    blocks: tuple[int, int]
    reason: str
    replacement: list[Hop]
    replayed_tokens: int
    started: float  # time.monotonic() when the failure was seen
    seconds: float = 0.0  # from the failure until the step went through
    kept_hops: int = 0  # hops after the lost one whose sessions went on (push mode)
    # Seconds from `started` to each stage: "routed", "opened <peer>", "stepped <peer>", ...
    phases: dict[str, float] = field(default_factory=dict)

    def mark(self, stage: str) -> None:
        self.phases[stage] = time.monotonic() - self.started

    def summary(self) -> str:
        return (
            f"blocks {self.blocks[0]}:{self.blocks[1]} lost with peer ...{str(self.peer_id)[-6:]}"
            f" ({self.reason}); re-routed via {describe(self.replacement)}, replayed "
            f"{self.replayed_tokens} tokens"
            + (f", kept the {self.kept_hops} hops after it" if self.kept_hops else "")
            + f", recovered in {self.seconds * 1000:.0f} ms"
        )


def _reason(error: BaseException, peer_id: str, limit: int = 160) -> str:
    """One line for a failover: the peer id shortened as elsewhere, cut at a word if long."""
    text = " ".join(f"{type(error).__name__}: {error}".split()).rstrip(":")
    text = text.replace(peer_id, f"...{peer_id[-6:]}")
    if len(text) > limit:
        text = text[:limit].rsplit(" ", 1)[0] + " ..."
    return text


def _put(buffer: torch.Tensor | None, at: int, x: torch.Tensor) -> torch.Tensor:
    """`buffer` [B, capacity, H] with `x` written at positions [at, at + T), grown if needed.

    Capacity doubles as it fills, so each step writes its few positions instead of copying the
    whole history; what lies before `at` is kept.
    """
    need = at + x.shape[1]
    if buffer is None or need > buffer.shape[1]:
        capacity = max(need, 2 * (0 if buffer is None else buffer.shape[1]), 16)
        grown = x.new_empty(x.shape[0], capacity, x.shape[2])
        if buffer is not None:
            grown[:, :at] = buffer[:, :at]
        buffer = grown
    buffer[:, at:need] = x
    return buffer


@dataclass
class _HopState:
    """A hop of the route with the inputs sent to its first block and what its peer holds."""

    hop: Hop
    buffer: torch.Tensor | None = None  # inputs [B, capacity, H] of positions 0..length-1
    length: int = 0  # positions in the buffer
    cached: int = 0  # positions the peer holds in its cache
    stream: StepStream | None = None
    opening: asyncio.Task | None = None
    lost: BaseException | None = None  # set when its peer failed and no replacement was found
    # What its peer returned for positions 0..out_length-1 (kept only when outputs are verified)
    out_buffer: torch.Tensor | None = None
    out_length: int = 0
    # A failover changed its previous hop and its peer has not been told: the next step goes
    # through us (a pushed step could reach it before the step message that tells it).
    prev_untold: bool = False

    def append(self, x: torch.Tensor) -> None:
        if x.shape[1]:
            self.buffer = _put(self.buffer, self.length, x)
            self.length += x.shape[1]

    def keep_outputs(self, start: int, out: torch.Tensor) -> None:
        self.out_buffer = _put(self.out_buffer, start, out)
        self.out_length = start + out.shape[1]

    def truncate(self, length: int) -> None:
        self.length = min(self.length, length)
        self.cached = min(self.cached, length)
        self.out_length = min(self.out_length, length)

    def inputs(self, start: int) -> torch.Tensor:
        """Inputs from position `start` on: a view, valid until the next append."""
        return self.buffer[:, start : self.length]

    def inherit(self, other: _HopState) -> None:
        """Take `other`'s inputs (a replacement replays them from position 0)."""
        self.buffer, self.length = other.buffer, other.length


class RemoteInferenceSession(PushSteps):
    """A multi-step session over every block of the model, re-routing around failed peers.

    For each hop the session keeps every input it sent. When a peer fails or times out, it is
    banned, exactly its span is re-routed (to one or several peers), the new peers get the kept
    inputs from position 0 to rebuild their caches, and the step goes on.

    router: chooses routes, opens streams, times and bans peers.
    max_length: most positions the session will hold (prompt plus generated tokens).
    batch_size: rows of every step.
    max_failovers: bound on re-routes within one step; beyond it the step fails.
    adapter: (start, end) -> the adapter payload of those blocks, or None (multi-LoRA serving).
    verifier: checks a fraction of steps on other replicas (petals_like.verify); a step may
        then raise RolledBack: the session went back to where a liar's outputs began.
    """

    def __init__(
        self,
        router: SessionRouter,
        max_length: int,
        batch_size: int = 1,
        max_failovers: int = 8,
        adapter: Any = None,
        verifier: Verifier | None = None,
    ):
        if max_length <= 0 or batch_size <= 0:
            raise BadRequest("max_length and batch_size must be positive")
        self.router = router
        self.max_length, self.batch_size = max_length, batch_size
        self.max_failovers = max_failovers
        self.adapter = adapter
        self.verifier = verifier
        self.verified = 0  # positions [0, verified) of every hop were checked (or uncheckable)
        self._check: asyncio.Task | None = None  # the check in flight, while steps go on
        self._unchanged = 0  # positions untouched since that check's snapshot
        self.position = 0
        self.failovers: list[Failover] = []
        self.pushed_steps = 0  # steps that went server to server (push mode)
        # Where each step began: a replay runs in these shapes, rebuilding caches bit for bit.
        self._bounds: list[int] = []
        self.session_id = uuid.uuid4().hex[:8]
        self._hops: list[_HopState] = []
        self._closed = False
        self._lock = asyncio.Lock()

    @property
    def route(self) -> list[Hop]:
        return [h.hop for h in self._hops]

    async def _new_hops(self, start: int, end: int, codec: str | None = None) -> list[_HopState]:
        hops = await self.router.route(start, end, self.max_length * self.batch_size)
        states = [_HopState(hop) for hop in hops]
        # Open every stream at once: the first step pays one round of dialling, not one per hop.
        for s in states:
            s.opening = asyncio.ensure_future(self._open(s.hop, codec))
        return states

    def _open(self, hop: Hop, codec: str | None = None):
        extra = {} if codec is None else {"codec": codec}
        if self.adapter is not None:
            extra["adapter"] = self.adapter(hop.start, hop.end)
        return self.router.open(hop, self.max_length, self.batch_size, **extra)

    async def step(self, hidden: torch.Tensor) -> torch.Tensor:
        """Run [B, T, H] hidden states for the next T positions through every block."""
        if self._closed:
            raise BadRequest("the inference session is closed")
        if hidden.dim() != 3 or hidden.shape[0] != self.batch_size:
            raise BadRequest(
                f"expected hidden states [batch={self.batch_size}, T, H], got {tuple(hidden.shape)}"
            )
        n = hidden.shape[1]
        pos = self.position
        if pos + n > self.max_length:
            raise BadRequest(
                f"the session holds at most {self.max_length} positions; {pos} used, {n} more asked"
            )
        async with self._lock:
            try:
                await self._settle(wait=False)  # a liar found meanwhile: RolledBack
                if not self._hops:
                    self._hops = await self._new_hops(0, self.router.num_blocks)
                self._cut_bounds(pos)
                self._bounds.append(pos)
                out = await self._run(hidden, pos)
                if self.verifier is not None and self._check is None and self._alone():
                    self.verified = pos + n  # nothing to check against: hold no text back
                elif self.verifier is not None and self.verifier.due():
                    await self._settle(wait=True)
                    self._start_check(pos + n)
            except RolledBack:
                raise
            except BaseException:
                # Forget this step's inputs so that the session can be stepped again later.
                for h in self._hops:
                    h.truncate(pos)
                self._cut_bounds(pos)
                raise
        self.position = pos + n
        return out

    def _exact_replay(self) -> bool:
        return getattr(getattr(self.router, "config", None), "exact_replay", True)

    def _cut_bounds(self, position: int) -> None:
        """Forget the step boundaries at `position` and beyond (a rollback, a failed step)."""
        while self._bounds and self._bounds[-1] >= position:
            self._bounds.pop()

    def _replay_steps(self, start: int, end: int) -> list[int]:
        """Lengths of the steps that built positions [start, end): a replay runs in these."""
        cuts = [start, *(p for p in self._bounds if start < p < end), end]
        return [b - a for a, b in zip(cuts, cuts[1:], strict=False)]

    async def rollback(self, position: int) -> None:
        """Keep the first `position` positions (speculative decoding dropped the rest).

        The peers are not told: the next step starts at `position`, and their caches overwrite
        what they held from there. The kept inputs are cut too, so a replay sends only these.
        """
        if not 0 <= position <= self.position:
            raise BadRequest(f"cannot roll back to {position}: the session holds {self.position}")
        async with self._lock:
            for h in self._hops:
                h.truncate(position)
            self._cut_bounds(position)
            self.position = position
            self.verified = min(self.verified, position)
            self._unchanged = min(self._unchanged, position)

    async def verify_now(self) -> None:
        """Check every hop's outputs so far (the end of a generation); may raise RolledBack."""
        if self.verifier is None or not self._hops:
            return
        async with self._lock:
            await self._settle(wait=True)
            if self.verified < self.position:
                self._start_check(self.position)
                await self._settle(wait=True)

    def _alone(self) -> bool:
        """Whether no hop of the route has a second replica to be checked against."""
        alone = True
        for h in self._hops:
            if self.router.replicas(h.hop.start, h.hop.end, {h.hop.peer_id}):
                alone = False
            else:
                self.verifier.no_replica(_span(h))
        return alone

    def _start_check(self, end_pos: int) -> None:
        """Check positions [0, end_pos) of every hop in the background: the steps go on meanwhile
        (what they make is held back by generate() until checked)."""
        hops = [h for h in self._hops if h.out_length >= end_pos and h.length >= end_pos]
        # Copies: a rollback or a replay rewrites the buffers while the check runs.
        work = [
            (
                h.hop,
                h.buffer[:, :end_pos].clone(),
                h.out_buffer[:, :end_pos].clone(),
                None if self.adapter is None else self.adapter(*_span(h)),
            )
            for h in hops
        ]
        self._unchanged = end_pos
        self._check = asyncio.ensure_future(self._check_all(work, end_pos))

    async def _check_all(self, work: list, end_pos: int) -> tuple[int, Liar | None]:
        found = await asyncio.gather(
            *(self.verifier.check(self.router, *w) for w in work), return_exceptions=True
        )
        for f in found:
            if isinstance(f, BaseException):  # a broken check is no verdict on the peer
                logger.warning("verification: a check failed: %r", f)
                return 0, None
        liars = [f for f in found if f is not None]
        return end_pos, min(liars, key=lambda f: f.position) if liars else None

    async def _settle(self, wait: bool) -> None:
        """Take the verdict of the check in flight (waiting for it if `wait`); on a liar on the
        route, cut the session at its first wrong position and raise RolledBack."""
        task = self._check
        if task is None or not (wait or task.done()):
            return
        self._check = None
        end_pos, liar = await task
        if liar is None:
            self.verified = max(self.verified, min(end_pos, self._unchanged))
            return
        await self._roll_back_from(liar)
        raise RolledBack(self.position, liar)

    async def _roll_back_from(self, liar: Liar) -> None:
        """Cut every hop at the liar's first wrong position; re-route the liars' spans."""
        p = liar.position
        for h in self._hops:
            h.truncate(p)
        self._cut_bounds(p)
        liars = {f.peer_id for f in self.verifier.liars}
        i = 0
        while i < len(self._hops):
            h = self._hops[i]
            if h.hop.peer_id not in liars:
                i += 1
                continue
            self._discard(h)
            new = await self._new_hops(h.hop.start, h.hop.end)
            new[0].inherit(h)
            self._hops[i : i + 1] = new
            i += len(new)
        self.position = min(self.position, p)
        self.verified = min(self.verified, p)
        self._unchanged = min(self._unchanged, p)

    async def _run(self, hidden: torch.Tensor, pos: int) -> torch.Tensor:
        if self._can_push(hidden, pos):
            return await self._run_push(hidden, pos)
        return await self._run_relay(hidden, pos, pos, 0, [])

    async def _run_relay(
        self,
        x: torch.Tensor,
        x_start: int,
        pos: int,
        i: int,
        failures: list[Failover],
        until: _HopState | None = None,
    ) -> torch.Tensor:
        """The step through hops i, i+1, ... via us: x holds the input of hop i for positions
        [x_start, end); hops that lost their cache replay their kept inputs first. With `until`,
        stops before that hop (whose step goes on elsewhere) and leaves `failures` unrecorded."""
        end_pos = x_start + x.shape[1]
        while i < len(self._hops) and self._hops[i] is not until:
            h = self._hops[i]
            if h.length < end_pos:
                if x_start > h.length:
                    raise RuntimeError(
                        f"session bookkeeping broke: hop {h.hop} holds {h.length} inputs, "
                        f"the activations start at {x_start}"
                    )
                h.append(x[:, h.length - x_start :])
            send_from = h.cached
            try:
                if h.lost is not None:
                    raise h.lost
                peer = h.hop.peer_id
                if h.stream is None:
                    h.stream = await self._await_open(h)
                    if failures:
                        failures[-1].mark(f"opened ...{str(peer)[-6:]}")
                inputs = h.inputs(send_from)
                timeout = self.router.step_timeout(peer, inputs.shape[1])
                t0 = time.perf_counter()
                extra = {}
                if getattr(h.stream, "supports_push", False):  # the peer may be pushed into
                    extra["prev_peer"] = str(self._hops[i - 1].hop.peer_id) if i else ""
                    if send_from < pos and self._exact_replay():
                        # The inputs as the peer first saw them, in the shapes first used
                        extra["codec"] = "none"
                        extra["steps"] = self._replay_steps(send_from, end_pos)
                    elif send_from == pos:  # keep what the peer decodes, for a replay
                        extra["encoded"], seen = h.stream.encode(inputs)
                        if seen is not inputs:  # lossless: inputs are what the peer decodes
                            h.buffer[:, send_from : h.length] = seen
                # The stream's own timeout shuts it down cleanly; ours is the safety net. The
                # stream checks the reply (swarm.peer.wire.decode): it has the inputs' shape.
                out = await self.router.guarded(
                    peer,
                    h.stream.step(inputs, send_from, timeout=timeout, **extra),
                    timeout + 0.5,
                    self.router.probe_after(peer, inputs.shape[1]),
                )
                self.router.report_success(h.hop.peer_id, time.perf_counter() - t0, inputs.shape[1])
                if failures:
                    failures[-1].mark(f"stepped ...{str(peer)[-6:]} ({inputs.shape[1]} positions)")
            except Exception as e:
                if not is_peer_failure(e):
                    raise
                failures.append(await self._fail_over(i, e, len(failures), h.lost is None))
                continue
            h.cached = end_pos
            h.prev_untold = h.prev_untold and "prev_peer" not in extra
            if self.verifier is not None:
                h.keep_outputs(send_from, out)
            x, x_start = out, send_from
            i += 1
        if until is None:
            self._record(failures)
        return x[:, pos - x_start :]

    def _record(self, failures: list[Failover]) -> None:
        done = time.monotonic()
        for f in failures:
            f.seconds = done - f.started
            logger.warning("failover: %s", f.summary())
        self.failovers.extend(failures)

    async def _await_open(self, h: _HopState) -> StepStream:
        if h.opening is None:
            h.opening = asyncio.ensure_future(self._open(h.hop))
        try:
            # Dialling a dead peer whose p2pd lives on hangs: probe it rather than wait it out.
            return await self.router.guarded(
                h.hop.peer_id,
                h.opening,
                self.router.open_timeout,
                self.router.probe_after(h.hop.peer_id, 1),
            )
        finally:
            h.opening = None

    async def _fail_over(
        self, i: int, error: BaseException, n_before: int, report: bool = True
    ) -> Failover:
        """Replace hop i by a fresh route over its blocks; the first new hop inherits its inputs."""
        started = time.monotonic()
        lost = self._hops[i]
        reason = _reason(error, str(lost.hop.peer_id))
        if report:
            logger.info(
                "peer %s failed on blocks %d:%d: %s",
                lost.hop.peer_id,
                lost.hop.start,
                lost.hop.end,
                reason,
            )
            self.router.report_failure(lost.hop.peer_id, error)
        codec = getattr(lost.stream, "codec", None)  # the replacement's: same bits, no probe
        self._discard(lost)
        lost.lost = error
        if n_before + 1 > self.max_failovers:
            raise PeerUnavailable(
                f"gave up after {self.max_failovers} failovers in one step; last: peer "
                f"{lost.hop.peer_id} on blocks {lost.hop.start}:{lost.hop.end} ({reason})"
            ) from error
        new = await self._new_hops(lost.hop.start, lost.hop.end, codec)
        new[0].inherit(lost)
        self._hops[i : i + 1] = new
        failover = Failover(
            peer_id=lost.hop.peer_id,
            blocks=(lost.hop.start, lost.hop.end),
            reason=reason,
            replacement=[s.hop for s in new],
            replayed_tokens=lost.length,
            started=started,
        )
        failover.mark("routed")
        return failover

    def _discard(self, h: _HopState) -> None:
        """Drop a hop's stream without waiting on a peer that may be gone."""
        if h.opening is not None:
            h.opening.cancel()
        if h.stream is not None:
            task = asyncio.ensure_future(_close_quietly(h.stream, timeout=1.0))
            task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)
        h.stream, h.opening = None, None

    async def close(self) -> None:
        """Close every peer's stream (each bounded by a short timeout)."""
        if self._closed:
            return
        self._closed = True
        if self._check is not None:
            self._check.cancel()
        tasks = []
        for h in self._hops:
            if h.opening is not None:
                h.opening.cancel()
            if h.stream is not None:
                tasks.append(_close_quietly(h.stream, timeout=2.0))
        await asyncio.gather(*tasks, return_exceptions=True)
        self._hops = []


def _span(h: _HopState) -> tuple[int, int]:
    return h.hop.start, h.hop.end


async def _close_quietly(stream: StepStream, timeout: float) -> None:
    try:
        await within(stream.close(), timeout)
    except Exception as e:  # the peer may be dead: closing is best effort
        logger.debug("closing a stream: %r", e)
