"""The client's router: span records refreshed from the DHT, round trips, bans, codecs, timeouts.

Used by RemoteInferenceSession (routes, streams, failure reports) and DistributedModelForCausalLM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from petals_like import codec_policy
from petals_like.bans import BanList
from petals_like.codec_policy import CodecChoice
from petals_like.latency import StepLatency
from petals_like.probing import guarded, is_timeout
from petals_like.routing import Hop, RouteCosts, block_time, find_route, missing_blocks, usable
from swarm.errors import NoRoute, PeerUnavailable
from swarm.loops import within

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Lossy codecs "auto" may fall back to, best first (petals_like.codec_policy).
AUTO_CODECS = codec_policy.LOSSY


@dataclass
class RouterConfig:
    """Settings of the client's router.

    update_period: seconds between background refreshes of span records from the DHT.
    ping_period: seconds between round-trip measurements of the peers.
    dht_timeout: bound on one DHT read.
    ping_timeout: bound on one round-trip measurement; a peer slower than this is avoided.
    open_timeout: bound on opening an inference stream.
    min_step_timeout, max_step_timeout: bounds of the per-step timeout.
    first_step_timeout: the least timeout of a peer whose latency we have not measured yet
        (a dead peer is still found at once by the probe below; this only waits on live ones).
    timeout_factor: a step may take this many times its expected latency before the peer is
        declared hung.
    probe_factor, min_probe_after: a step still running after max(min_probe_after,
        probe_factor * expected latency) makes us probe the peer with a small RPC: a peer whose
        process died answers that at once with an error (its orphaned p2pd lives on and keeps the
        stream open), so the loss is seen in milliseconds rather than at the timeout.
    per_token_default: seconds per token per block assumed before a peer was measured.
    ban_period, ban_growth, max_ban: ban of a failed peer: first period, growth, longest.
    compression: wire codec of activations: "none", "auto" (per peer, measured when its first
        stream opens: fp32 unless its link makes that cost over a tenth of the step, then bf16
        unless that costs over a quarter, then the faster of bf16 and the first of AUTO_CODECS
        it advertises; petals_like.codec_policy) or a codec name (used where the peer
        advertises it, else "none").
    push: each peer pushes a step's output straight to the next hop (a token costs hops + 1
        one-way delays, not 2 x hops) where every hop's peer offers it; False: relay via us.
    exact_replay: a failover's replay runs in the step shapes first used, uncompressed, so the
        rebuilt caches (and text) are bit for bit the lost ones; it costs one compute step per
        step replayed (in one message, one compute call on the peer). False: one step for the
        whole prefix (faster, but not bit-exact even with fp32 or bf16 weights and no codec:
        matmuls round by step shape, tests/peer/test_replay_shapes.py; a word may change).
    direct: streams go on a peer's direct channel where it announces one (plain TCP keyed over
        libp2p, without the two p2pd daemons: swarm.peer.direct); False: libp2p only.
    """

    update_period: float = 10.0
    ping_period: float = 30.0
    dht_timeout: float = 5.0
    ping_timeout: float = 2.0
    open_timeout: float = 5.0
    min_step_timeout: float = 3.0
    first_step_timeout: float = 15.0
    max_step_timeout: float = 60.0
    timeout_factor: float = 8.0
    probe_factor: float = 2.0
    min_probe_after: float = 0.05
    per_token_default: float = 0.002
    ban_period: float = 15.0
    ban_growth: float = 2.0
    max_ban: float = 600.0
    compression: str = "auto"
    push: bool = True
    exact_replay: bool = True
    direct: bool = True


class SwarmRouter:
    """Span records, round trips and bans of the swarm serving one model; routes and streams.

    dht: a running hivemind.DHT (client mode is enough).
    client: a swarm.peer.client.PeerClient (its `link` emulates a WAN: swarm.link); each
        stream names its codec when it opens.
    model_prefix, num_blocks: the model's DHT prefix and block count.
    fetch: coroutine function (dht, prefix, num_blocks, timeout) -> records; the DHT by default.
    """

    def __init__(
        self,
        dht: Any,
        client: Any,
        model_prefix: str,
        num_blocks: int,
        config: RouterConfig | None = None,
        costs: RouteCosts | None = None,
        fetch: Any = None,
    ):
        self.dht, self.client = dht, client
        self.model_prefix, self.num_blocks = model_prefix, num_blocks
        self.config = config or RouterConfig()
        self.costs = costs or RouteCosts()
        self.bans = BanList(self.config.ban_period, self.config.ban_growth, self.config.max_ban)
        self.records: list[Any] = []
        self.rtts: dict[str, float] = {}
        self._latency: dict[str, StepLatency] = {}
        self.liars: set[Any] = set()  # peers caught lying by verification (petals_like.verify)
        self._fetch = fetch
        self._task: asyncio.Task | None = None
        self._refresh_lock: asyncio.Lock | None = None
        self._rng = random.Random()
        self.hidden_size = 0  # the model's (set by DistributedModelForCausalLM); 0: ask peers
        self.codec_choices: dict[Any, CodecChoice] = {}  # "auto": fixed per peer once measured
        self._choosing: dict[Any, asyncio.Future] = {}
        self.codec_wait: dict[Any, float] = {}  # seconds the last open waited for its codec
        self._probing: asyncio.Lock | None = None  # one link probe at a time: they share our uplink

    # ---- the swarm's state ---------------------------------------------------------------------
    async def start(self) -> None:
        """First refresh and round trips, then background refreshes."""
        self._refresh_lock = asyncio.Lock()
        await self.refresh()
        await self.ping_all()
        self._task = asyncio.ensure_future(self._background())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
            self._task = None

    async def refresh(self) -> None:
        """Read span records from the DHT (bounded by dht_timeout); keep the old view on failure."""
        if self._refresh_lock is None:
            self._refresh_lock = asyncio.Lock()
        async with self._refresh_lock:
            try:
                if self._fetch is not None:
                    fetch = self._fetch
                else:
                    from swarm.peer import fetch_swarm_async as fetch
                records = await within(
                    fetch(self.dht, self.model_prefix, self.num_blocks, self.config.dht_timeout),
                    self.config.dht_timeout + 1.0,
                )
            except (PeerUnavailable, asyncio.TimeoutError, OSError) as e:
                logger.warning("could not refresh the swarm's records: %s", e)
                return
            self.records = list(records)
            learn = getattr(self.client, "learn_addrs", None)  # test doubles may not dial
            if learn is not None:
                learn(self.records)  # relayed peers are dialled through their circuit addrs
            prefetch = getattr(self.client, "prefetch_tickets", None)
            if prefetch is not None:  # the nearest first: routes prefer them
                online = {r.peer_id for r in self.records if r.state == "online"}
                online -= self.bans.banned()
                nearest = sorted(online, key=lambda p: self.rtts.get(p, float("inf")))
                prefetch(nearest)

    async def ping(self, peer_id: str) -> float | None:
        """Measure one round trip to `peer_id` (None if it did not answer in time)."""
        t0 = time.perf_counter()
        try:
            await within(
                self.client.info(peer_id, timeout=self.config.ping_timeout),
                self.config.ping_timeout + 0.5,
            )
        except Exception as e:
            self.rtts[peer_id] = self.config.ping_timeout * 2
            if is_timeout(e):  # slow or hung: avoided by routing until it answers again
                logger.debug("ping to %s timed out: %r", peer_id, e)
                return None
            # Refused: its process is gone though its DHT record may live on.
            logger.info("peer %s does not answer (%s); banning it", peer_id, e)
            self.bans.ban(peer_id, reason="(ping failed)")
            return None
        rtt = time.perf_counter() - t0
        old = self.rtts.get(peer_id)
        self.rtts[peer_id] = rtt if old is None else 0.7 * old + 0.3 * rtt
        return rtt

    async def ping_all(self) -> None:
        peers = {r.peer_id for r in self.records if r.state == "online"} - self.bans.banned()
        await asyncio.gather(*(self.ping(p) for p in peers))

    async def _background(self) -> None:
        last_ping = time.monotonic()
        while True:
            period = self.config.update_period
            await asyncio.sleep(period * (0.9 + 0.2 * self._rng.random()))
            await self.refresh()
            known = set(self.rtts)
            fresh = {r.peer_id for r in self.records} - known
            if time.monotonic() - last_ping > self.config.ping_period:
                await self.ping_all()
                last_ping = time.monotonic()
            elif fresh:
                await asyncio.gather(*(self.ping(p) for p in fresh))

    # ---- what sessions use -----------------------------------------------------------------------
    async def route(self, start: int, end: int, cache_tokens_needed: int) -> list[Hop]:
        """The cheapest chain over blocks [start, end); raises NoRoute naming uncovered blocks.

        Refreshes the view once if it has a gap. If only banned peers could fill a gap, those
        that answer a probe get a second chance (one bounded round): a crashed peer fails the
        probe at once and stays banned; a peer that was only slow (loading, overloaded) returns.
        """
        if not self.records or missing_blocks(self.records, start, end, self.bans.banned()):
            await self.refresh()
        try:
            return self._find(start, end, cache_tokens_needed)
        except NoRoute:
            pass
        banned = self.bans.banned()
        gap = set(missing_blocks(self.records, start, end, banned))
        suspects = [
            r.peer_id
            for r in self.records
            if r.peer_id in banned
            and r.peer_id not in self.liars  # alive, but caught lying: no second chance
            and r.state == "online"
            and gap & set(range(r.start, r.end))
        ]
        answered = await asyncio.gather(*(self._answers(p) for p in suspects))
        for peer_id, ok in zip(suspects, answered, strict=True):
            if ok:
                logger.info("banned peer %s answers again: lifting its ban", peer_id)
                self.bans.lift(peer_id)
        try:
            return self._find(start, end, cache_tokens_needed)
        except NoRoute as e:
            gone = sorted(str(p)[-6:] for p in self.bans.banned())
            hint = f" (peers banned after failures: ...{', ...'.join(gone)})" if gone else ""
            raise NoRoute(f"{e}{hint}") from None

    def _find(self, start: int, end: int, cache_tokens_needed: int) -> list[Hop]:
        return find_route(
            self.records,
            start,
            end,
            rtts=self.rtts,
            banned=self.bans.banned(),
            cache_tokens_needed=cache_tokens_needed,
            costs=self.costs,
            rng=self._rng,
            block_time_floor=self.block_time_floors(),
        )

    def block_time_floors(self) -> dict[Any, float]:
        """Seconds per block we believe of each peer at the least: advertised speed is cheap.

        A peer that served us single-token steps is believed no faster than they took (step
        time less round trip and hop overhead, per block of its span). A peer not measured yet
        is believed no faster than the fastest measured peer (its claim or its measurement,
        whichever is slower), so that a number alone cannot buy the route; with nobody
        measured yet, claims are all there is to go on.
        """
        floors: dict[Any, float] = {}
        best = float("inf")
        records = usable(self.records, self.bans.banned())
        for r in records:
            lat = self._latency.get(r.peer_id)
            if lat is None or not lat.measured:
                continue
            rtt = self.rtts.get(r.peer_id, 0.0)
            spent = max(0.0, lat.fixed - rtt - self.costs.hop_overhead)
            floors[r.peer_id] = spent / max(1, r.end - r.start)
            best = min(best, max(floors[r.peer_id], block_time(r, self.costs)))
        if best < float("inf"):
            for r in records:
                floors.setdefault(r.peer_id, best)
        return floors

    async def _answers(self, peer_id: str) -> bool:
        try:
            await within(self.probe(peer_id), self.config.ping_timeout + 0.5)
            return True
        except Exception as e:  # the probe's verdict: gone or hung
            logger.debug("probe of banned peer %s: %r", peer_id, e)
            return False

    def codec_for(self, peer_id: str) -> str:
        """The activation codec to use with `peer_id`: what we want, if it advertises it.

        Under "auto", the codec measured for the peer (session_codec), else the lossy default
        (stateless calls: training, verification, before any stream was opened).
        """
        want = self.config.compression
        if want == "none":
            return "none"
        if want == "auto" and peer_id in self.codec_choices:
            return self.codec_choices[peer_id].codec
        record = next((r for r in self.records if r.peer_id == peer_id), None)
        offered = tuple(getattr(record, "codecs", ()) or ())
        if want == "auto":
            return next((c for c in AUTO_CODECS if c in offered), "none")
        return want if want in offered else "none"

    async def session_codec(self, hop: Hop) -> str:
        """The codec of a stream on hop's peer: under "auto", measured once per peer and kept.

        Kept for the router's life, so a peer's streams (and replays to it) never change codec.
        Probing takes at most half of open_timeout; a link too slow for that gets the lossy
        default, kept. A failed probe (peer gone) is not kept: the lossy default this time.
        """
        if self.config.compression != "auto":
            return self.codec_for(hop.peer_id)
        peer_id = hop.peer_id
        if peer_id in self.codec_choices:
            return self.codec_choices[peer_id].codec
        pending = self._choosing.get(peer_id)
        if pending is None:
            pending = self._choosing[peer_id] = asyncio.ensure_future(self._choose_codec(hop))
            pending.add_done_callback(lambda _f: self._choosing.pop(peer_id, None))
        return await asyncio.shield(pending)

    async def _choose_codec(self, hop: Hop) -> str:
        record = next((r for r in self.records if r.peer_id == hop.peer_id), None)
        offered = tuple(getattr(record, "codecs", ()) or ())
        choices = (*AUTO_CODECS, codec_policy.NEAR_LOSSLESS)
        if not any(c in offered for c in choices):  # nothing to choose from
            self.codec_choices[hop.peer_id] = CodecChoice("none", None)
            return "none"
        budget = self.config.open_timeout / 2  # the open that follows must fit in what is left
        if self._probing is None:
            self._probing = asyncio.Lock()
        try:
            link, hidden = await within(self._measure(hop), budget)
        except asyncio.TimeoutError:  # a link too slow to probe in time is slow: compress
            codec = self.codec_for(hop.peer_id)
            self.codec_choices[hop.peer_id] = CodecChoice(codec, None)
            logger.info("probing the link to %s took over %.1f s: %s", hop.peer_id, budget, codec)
            return codec
        except Exception as e:  # the open that follows reports a dead peer properly
            logger.info("could not measure the link to %s (%r): lossy default", hop.peer_id, e)
            return self.codec_for(hop.peer_id)
        # The measured step; advertised speeds (often measured under other load) otherwise.
        blocks = max(0, hop.end - hop.start - 1)
        hop_s = link.step or link.rtt + blocks * block_time(record, self.costs)
        choice = codec_policy.choose(offered, hidden, link, hop_s)
        self.codec_choices[hop.peer_id] = choice
        logger.info(
            "codec for %s: %s (link %.1f Mbit/s, step %.1f ms, fp32 transfer %.1f%% of it)",
            hop.peer_id,
            choice.codec,
            link.mbit_per_s,
            hop_s * 1000,
            choice.lossless_share * 100,
        )
        return choice.codec

    async def _measure(self, hop: Hop) -> tuple[codec_policy.LinkEstimate, int]:
        """The link to hop's peer (codec_policy.measure_link) and the model's hidden size."""
        async with self._probing:  # concurrent probes would time each other's bytes
            hidden = self.hidden_size or int(
                (await self.client.info(hop.peer_id, timeout=self.config.ping_timeout)).hidden_size
            )
            link = await codec_policy.measure_link(
                self.client, hop.peer_id, hop.start, hop.end, hidden, self.config.open_timeout
            )
            return link, hidden

    async def open(
        self,
        hop: Hop,
        max_length: int,
        batch_size: int,
        adapter: Any = None,
        codec: str | None = None,
    ) -> Any:
        """An inference stream on hop's peer for its blocks (with an adapter for them, if any).

        codec: a failover's replacement takes the lost hop's codec, kept for the peer if none was
        measured yet: the text stays the same and the open does not wait for a link probe.
        """
        extra = {} if adapter is None else {"adapter": adapter}
        t0 = time.perf_counter()
        if codec is not None and self.config.compression == "auto":
            offered = next((r.codecs for r in self.records if r.peer_id == hop.peer_id), ())
            if codec == codec_policy.LOSSLESS or codec in (offered or ()):
                self.codec_choices.setdefault(hop.peer_id, CodecChoice(codec, None))
        codec = await self.session_codec(hop)
        self.codec_wait[hop.peer_id] = time.perf_counter() - t0
        return await within(
            self.client.open_inference(
                hop.peer_id,
                hop.start,
                hop.end,
                max_length=max_length,
                batch_size=batch_size,
                timeout=self.config.open_timeout,
                codec=codec,
                **extra,
            ),
            self.config.open_timeout + 0.5,
        )

    async def push(
        self, peer_id: Any, session_id: str, hidden: torch.Tensor, position: int, timeout: float
    ) -> None:
        """Push a step's input into our session on `peer_id` (PeerClient.push)."""
        await self.client.push(peer_id, session_id, hidden, position, timeout)

    @property
    def open_timeout(self) -> float:
        """Bound on opening a stream, dialling included."""
        return self.config.open_timeout + 1.0

    def _latency_of(self, peer_id: Any) -> StepLatency:
        lat = self._latency.get(peer_id)
        if lat is None:
            rtt = min(1.0, self.rtts.get(peer_id, self.costs.default_rtt))
            record = next((r for r in self.records if r.peer_id == peer_id), None)
            blocks = record.end - record.start if record is not None else self.num_blocks
            lat = self._latency[peer_id] = StepLatency(rtt, self.config.per_token_default * blocks)
        return lat

    def step_timeout(self, peer_id: Any, n_tokens: int) -> float:
        """How long a step of n tokens may take on this peer before it counts as hung."""
        lat = self._latency_of(peer_id)
        expected = lat.expect(n_tokens)
        floor = self.config.min_step_timeout if lat.measured else self.config.first_step_timeout
        timeout = self.config.timeout_factor * expected
        return min(self.config.max_step_timeout, max(floor, timeout))

    def probe_after(self, peer_id: Any, n_tokens: int) -> float:
        """When to check that a peer still lives while a step of n tokens waits on it."""
        expected = self._latency_of(peer_id).expect(n_tokens)
        return max(self.config.min_probe_after, self.config.probe_factor * expected)

    async def probe(self, peer_id: Any) -> None:
        """Raise if the peer is gone (its handlers are not there); returns if it answers."""
        await self.client.info(peer_id, timeout=self.config.ping_timeout)

    async def guarded(
        self, peer_id: Any, work: Awaitable[T], timeout: float, probe_after: float
    ) -> T:
        """Await `work` on `peer_id` for at most `timeout` s, probing the peer if it is slow.

        Raises PeerUnavailable as soon as a probe shows the peer gone, asyncio.TimeoutError at
        the timeout; cancels `work` in both cases (petals_like.probing.guarded).
        """
        return await guarded(peer_id, work, timeout, probe_after, lambda: self.probe(peer_id))

    # ---- what verification uses (petals_like.verify) ------------------------------------------
    def replicas(self, start: int, end: int, exclude: set) -> list[Any]:
        """Usable peers that serve all of blocks [start, end), except those in `exclude`."""
        banned = self.bans.banned()
        return sorted(
            {
                r.peer_id
                for r in usable(self.records, banned)
                if r.start <= start and r.end >= end and r.peer_id not in exclude
            },
            key=str,
        )

    async def forward(
        self,
        peer_id: Any,
        hidden: torch.Tensor,
        start: int,
        end: int,
        timeout: float,
        adapter: Any = None,
    ) -> torch.Tensor:
        """Blocks [start, end) of `peer_id` on `hidden` from position 0, with no cache."""
        extra = {} if adapter is None else {"adapter": adapter}
        return await within(
            self.client.forward(
                peer_id,
                hidden,
                start,
                end,
                timeout=timeout,
                codec=self.codec_for(peer_id),
                **extra,
            ),
            timeout + 0.5,
        )

    def ban_liar(self, peer_id: Any, reason: str, period: float) -> None:
        self.liars.add(peer_id)
        self.bans.ban(peer_id, reason=reason, period=period)
        self._latency.pop(peer_id, None)

    def report_success(self, peer_id: Any, seconds: float, n_tokens: int) -> None:
        self._latency_of(peer_id).update(seconds, n_tokens)
        self.bans.forgive(peer_id)

    def report_failure(self, peer_id: Any, error: BaseException) -> None:
        self.bans.ban(peer_id, reason=f"({type(error).__name__}: {error})"[:200])
        self._latency.pop(peer_id, None)
