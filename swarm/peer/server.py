"""Peer: joins the DHT, picks and loads a span, serves it, announces it, rebalances, drains.

Used by the `swarm-peer join` CLI (and by tests and benchmarks that run peers in-process).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import hivemind
import torch

from kernels import DTYPES
from swarm.model.llama import BlockSpan
from swarm.model.loading import load_config, load_span, resolve_model
from swarm.peer import balancer, pings
from swarm.peer.backend import SpanBackend
from swarm.peer.client import PeerClient
from swarm.peer.config import PeerConfig
from swarm.peer.dht_view import (
    dht_time,
    fetch_swarm_async,
    store_model_entry_async,
    store_records_async,
)
from swarm.peer.handler import PeerHandler
from swarm.peer.memory import CacheBudget
from swarm.peer.records import ModelEntry, SpanRecord
from swarm.peer.throughput import BlockThroughput, get_block_throughput
from swarm.peer.worker import ComputeWorker

logger = logging.getLogger(__name__)


def memory_span_length(config, quant: str, dtype: torch.dtype, num_layers: int) -> int:
    """How many blocks half of the available memory holds (at least 1, at most the model)."""
    per_block = config.num_params_per_block() * (1 if quant == "int8" else dtype.itemsize)
    available = 8 << 30
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    return max(1, min(num_layers, int(available * 0.5 // max(per_block, 1))))


class Peer:
    """One serving peer. `run()` blocks until SIGTERM/SIGINT or `stop()`.

    Create it before any thread or event loop exists in the process: the DHT forks.
    """

    def __init__(self, config: PeerConfig, on_maddrs: Callable[[list[str]], None] | None = None):
        config.validate()
        self.config = config
        self.rng = random.Random(config.seed)
        self.source = resolve_model(config.model)
        self.model_config = load_config(self.source)
        self.prefix = self.source.name
        self.num_layers = self.model_config.num_layers
        self.dtype = DTYPES.get(config.dtype)
        if self.dtype is None:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}")
        fixed = config.span()
        if fixed is not None and fixed[1] > self.num_layers:
            raise ValueError(f"--stage {config.stage}: the model has {self.num_layers} blocks")
        self.span_length = (
            fixed[1] - fixed[0]
            if fixed
            else min(config.num_blocks, self.num_layers)
            if config.num_blocks
            else memory_span_length(self.model_config, config.quant, self.dtype, self.num_layers)
        )
        host_maddrs = [f"/ip4/{config.host}/tcp/{config.port}"]
        if ":" in config.host:
            host_maddrs = [f"/ip6/{config.host}/tcp/{config.port}"]
        self.dht = hivemind.DHT(
            initial_peers=config.initial_peers or None,
            host_maddrs=host_maddrs,
            announce_maddrs=config.announce_maddrs or None,
            identity_path=config.identity,
            start=True,
        )
        self.peer_id = self.dht.peer_id.to_base58()
        self.maddrs = [str(m) for m in self.dht.get_visible_maddrs()]
        if on_maddrs is not None:
            on_maddrs(self.maddrs)
        self.handler: PeerHandler | None = None
        self.worker: ComputeWorker | None = None
        self.budget = CacheBudget(config.cache_tokens)
        self.block_speed = BlockThroughput(0.0, 0.0)
        self.start = self.end = 0
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.moves = 0
        self.next_pings: dict[str, float] = {}  # RTTs to next-hop peers, announced for routing
        self._cooldown_until = 0.0

    # ---- lifecycle ----------------------------------------------------------------------------
    def run(self) -> int:
        try:
            return asyncio.run(self._main())
        finally:
            self.dht.shutdown()

    def stop(self) -> None:
        """Ask the peer to shut down (thread-safe)."""
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)

    async def _main(self) -> int:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                self._loop.add_signal_handler(sig, self._stop.set)
        p2p = await self.dht.replicate_p2p()
        self.worker = ComputeWorker()
        tasks: list[asyncio.Task] = []
        try:
            # Measured (or read from the cache) first, so even our "joining" record has a speed.
            self.block_speed = await asyncio.to_thread(self._measure)
            start, end = await self._choose_span()
            if self._stop.is_set():
                return 0
            self.start, self.end = start, end
            await self._announce("joining")
            backend = await self._load(start, end)
            self.handler = PeerHandler(backend, self.worker, self.budget, self.config, self.prefix)
            self.handler.throughput = self._throughput()
            await self.handler.add_p2p_handlers(p2p)
            self.handler.state = "online"
            await self._announce("online")
            logger.info("serving blocks %d:%d of %s as %s", start, end, self.prefix, self.peer_id)
            tasks.append(asyncio.create_task(self._announce_loop()))
            tasks.append(asyncio.create_task(self._ping_loop(PeerClient(p2p))))
            if self.config.span() is None:
                tasks.append(asyncio.create_task(self._rebalance_loop()))
            await self._stop.wait()
            await self._shutdown()
            return 0
        finally:
            for task in tasks:
                task.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.gather(*tasks, return_exceptions=True)
            if self.handler is not None:
                with contextlib.suppress(Exception):
                    await self.handler.remove_p2p_handlers(p2p)
            self.worker.stop()

    async def _shutdown(self) -> None:
        """Preemption: announce offline at once, refuse new sessions, finish in-flight work."""
        handler = self.handler
        handler.draining = True
        handler.state = "offline"
        await self._announce("offline")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.shutdown_grace
        while (handler.inflight or handler.sessions) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if handler.sessions:
            logger.info("dropping %d sessions after the grace period", len(handler.sessions))
        await handler.close_all_sessions()

    # ---- span choice and loading --------------------------------------------------------------
    async def _choose_span(self) -> tuple[int, int]:
        fixed = self.config.span()
        if fixed is not None:
            return fixed
        # Peers started together would all see the same swarm: spread their choices in time.
        delay = self.rng.uniform(0, self.config.max_start_delay)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stop.wait(), delay)
        return await self._place(await self._fetch())

    async def _place(self, records: list[SpanRecord]) -> tuple[int, int]:
        """The span `--stage auto` serves, given the swarm's records (ours excluded here)."""
        spans = [_span_info(r) for r in records if r.peer_id != self.peer_id]
        start, end = balancer.choose_span(spans, self.num_layers, self.span_length, self.rng)
        logger.info("chose blocks %d:%d (swarm had %d peers)", start, end, len(spans))
        return start, end

    async def _load(self, start: int, end: int) -> SpanBackend:
        span = await asyncio.to_thread(
            load_span,
            self.source,
            start,
            end,
            quant=self.config.quant,
            dtype=self.dtype,
            progress=False,
        )
        return SpanBackend(span, self.dtype)

    def _measure(self) -> BlockThroughput:
        """One block's speed on this machine: cached, else timed on a random block of this shape."""
        span = BlockSpan(self.model_config, 0, 1).to(self.dtype)
        if self.config.quant == "int8":
            from swarm.model.int8 import quantize_blocks

            quantize_blocks(span.blocks[0])
        return get_block_throughput(
            self.prefix, span, self.config.quant, self.dtype, self.config.throughput_cache
        )

    def _throughput(self) -> float:
        # Tokens/s through each of our blocks while we serve all of them.
        return self.block_speed.forward_tps / max(1, self.end - self.start)

    # ---- announcing ---------------------------------------------------------------------------
    def _record(self, state: str, start: int | None = None, end: int | None = None) -> SpanRecord:
        start = self.start if start is None else start
        end = self.end if end is None else end
        n = max(1, end - start)
        return SpanRecord(
            peer_id=self.peer_id,
            start=start,
            end=end,
            state=state,
            throughput=self._throughput(),
            cache_tokens_left=self.budget.left,
            codecs=tuple(self.handler.codecs) if self.handler else (),
            quant=self.config.quant,
            version=self.config.version,
            inference_rps=self.block_speed.inference_rps / n,
            forward_tps=self.block_speed.forward_tps / n,
            addrs=tuple(self.maddrs),
            run_id=self.config.run_id if self.config.train else "",
            next_pings=dict(self.next_pings),
        )

    async def _announce(self, state: str, blocks: range | None = None, record=None) -> bool:
        record = record or self._record(state)
        blocks = blocks if blocks is not None else range(record.start, record.end)
        expiration = dht_time() + 2 * self.config.announce_period
        ok = await store_records_async(
            self.dht, self.prefix, blocks, record, expiration, self.config.dht_timeout
        )
        if state != "offline":
            entry = ModelEntry(self.prefix, self.num_layers, self.model_config.hidden_size)
            await store_model_entry_async(
                self.dht, entry, self.peer_id, expiration, self.config.dht_timeout
            )
        if not ok:
            logger.warning("announcing %s for blocks %s did not fully succeed", state, blocks)
        return ok

    async def _announce_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.announce_period)
            try:
                await self._announce(self.handler.state)
            except Exception:
                logger.exception("announce failed; retrying next period")

    async def _ping_loop(self, client: PeerClient) -> None:
        """Each announce period, time the peers serving block `end` (Petals' next-hop pings)."""
        while True:
            try:
                end = self.end
                measured = {}
                if end < self.num_layers:  # the last span has no next hop
                    peers = pings.next_hop_peers(await self._fetch(), end, self.peer_id)
                    measured = await pings.measure_next_pings(client, peers)
                if end == self.end:  # a move meanwhile makes these the wrong next hops
                    self.next_pings = measured
            except Exception:
                logger.exception("measuring next-hop pings failed; retrying next period")
            await asyncio.sleep(self.config.announce_period)

    async def _fetch(self) -> list[SpanRecord]:
        return await fetch_swarm_async(
            self.dht, self.prefix, self.num_layers, timeout=self.config.dht_timeout
        )

    # ---- rebalancing --------------------------------------------------------------------------
    async def _rebalance_loop(self) -> None:
        while True:
            period = self.config.rebalance_period
            await asyncio.sleep(self.rng.uniform(0.5 * period, 1.5 * period))
            try:
                await self._maybe_move()
            except Exception:
                logger.exception("rebalancing check failed; trying again next period")

    async def _maybe_move(self) -> bool:
        if self.handler is None or self.handler.draining:
            return False
        records = await self._fetch()
        spans = [_span_info(r) for r in records if r.end <= self.num_layers]
        mine = [s for s in spans if s.peer_id == self.peer_id]
        if not mine or (mine[0].start, mine[0].end) != (self.start, self.end):
            return False  # our own record is not visible yet: decide on a view that has us
        uncovered = balancer.uncovered_blocks(spans, self.num_layers)
        cooling = self._loop.time() < self._cooldown_until
        if cooling and not uncovered:
            return False  # hysteresis: right after a move, only a coverage hole moves us again
        target = balancer.should_move(
            spans, self.num_layers, self.peer_id, self.config.balance_quality, self.rng
        )
        if target is None or target == (self.start, self.end):
            return False  # hysteresis: never reload the span we already serve
        await self._move(*target)
        return True

    async def _move(self, start: int, end: int) -> None:
        old_start, old_end = self.start, self.end
        logger.info("moving from blocks %d:%d to %d:%d", old_start, old_end, start, end)
        await self._announce("joining", record=self._record("joining", start, end))
        backend = await self._load(start, end)
        # Sessions opened on the old span keep their backend and finish there.
        self.handler.backend = backend
        self.start, self.end = start, end
        self.next_pings = {}  # pings to the old span's next hops; refreshed next period
        self.handler.throughput = self._throughput()
        await self._announce("online")
        gone = [b for b in range(old_start, old_end) if not start <= b < end]
        if gone:
            tomb = replace(self._record("offline"), start=old_start, end=old_end)
            await self._announce("offline", blocks=gone, record=tomb)
        self.moves += 1
        self._cooldown_until = self._loop.time() + 2 * self.config.rebalance_period
        logger.info("now serving blocks %d:%d", start, end)


def _span_info(r: SpanRecord) -> balancer.SpanInfo:
    return balancer.SpanInfo(r.peer_id, r.start, r.end, r.throughput, r.state)
