"""Peer: joins the DHT, picks and loads a span, serves it, announces it, rebalances, drains.

Used by the `swarm-peer join` CLI; `swarm.training.peer.TrainingPeer` extends it for training.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import signal
from collections.abc import Callable
from pathlib import Path

import torch

from kernels import DTYPES
from swarm import loops
from swarm.dht import make_dht
from swarm.link import Link
from swarm.model.llama import BlockSpan
from swarm.model.loading import load_config, load_span, resolve_model
from swarm.model.quantize import quantize_blocks_as
from swarm.net import check_initial_peers, ensure_port_free
from swarm.peer import balancer
from swarm.peer.announcer import Announcer
from swarm.peer.backend import SpanBackend
from swarm.peer.client import PeerClient
from swarm.peer.config import PeerConfig
from swarm.peer.dht_view import fetch_swarm_async
from swarm.peer.handler import PeerHandler
from swarm.peer.memory import CacheBudget
from swarm.peer.reachability import DialBackHandler, decide_reachability
from swarm.peer.records import ModelEntry, SpanRecord
from swarm.peer.relay import RelayedDaemon
from swarm.peer.throughput import BlockThroughput, get_block_throughput
from swarm.peer.worker import ComputeWorker
from swarm.quant import bytes_per_param
from swarm.threads import in_own_thread, serial_torch

LOOKUP_PERIOD = 60.0  # seconds between record reads for one next hop without a direct channel

logger = logging.getLogger(__name__)


def memory_span_length(config, quant: str, dtype: torch.dtype, num_layers: int) -> int:
    """How many blocks half of the available memory holds (at least 1, at most the model)."""
    per_block = config.num_params_per_block() * bytes_per_param(quant, dtype.itemsize)
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
        if config.torch_threads:  # before any compute: the worker thread inherits it
            torch.set_num_threads(config.torch_threads)
        self.rng = random.Random(config.seed)
        self.source = resolve_model(config.model)
        self.model_config = load_config(self.source)
        self.prefix = self.source.name
        self.num_layers = self.model_config.num_layers
        self.link = Link(config.link_delay, config.link_bandwidth)  # what every send pays
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
        check_initial_peers(config.initial_peers)
        ensure_port_free(config.host, config.port)
        if config.direct_port > 0:
            ensure_port_free(config.host, config.direct_port, "--direct-port")
        host_maddrs = [f"/ip4/{config.host}/tcp/{config.port}"]
        if ":" in config.host:
            host_maddrs = [f"/ip6/{config.host}/tcp/{config.port}"]
        self.reachability = decide_reachability(config, host_maddrs)
        self.relay: RelayedDaemon | None = None
        if self.reachability == "relayed":
            self.relay = RelayedDaemon(config.initial_peers, host_maddrs, config.identity).start()
            dht = None
            try:
                # The DHT only reads the daemon's control socket; client mode: nobody can dial
                # our DHT node, so others must not put us in their routing tables.
                dht = make_dht(
                    initial_peers=config.initial_peers,
                    p2p=self.relay,
                    identity_path=self.relay.identity_path,  # our key signs our records
                    client_mode=True,
                    start=True,
                )
                self.maddrs = self.relay.wait_reserved(config.relay_timeout)
            except BaseException:
                if dht is not None:
                    dht.shutdown()
                self.relay.close()
                raise
            self.dht = dht
            logger.info("serving through relays: %s", ", ".join(self.relay.reserved()))
        else:
            self.dht = make_dht(
                initial_peers=config.initial_peers or None,
                host_maddrs=host_maddrs,
                announce_maddrs=config.announce_maddrs or None,
                identity_path=config.identity,
                # Others can dial us: relay for peers behind NAT, without waiting for AutoNAT's
                # verdict (it needs several peers to dial us before it says "public").
                force_reachability="public",
                start=True,
            )
            self.maddrs = [str(m) for m in self.dht.get_visible_maddrs()]
        self.peer_id = self.dht.peer_id.to_base58()
        if on_maddrs is not None:
            on_maddrs(self.maddrs)
        entry = ModelEntry(self.prefix, self.num_layers, self.model_config.hidden_size)
        self.announcer = Announcer(self.dht, config, entry, self.peer_id, self.maddrs)
        self.announcer.reachability = self.reachability
        self.dial_back = DialBackHandler()
        self.peer_client: PeerClient | None = None
        self.handler: PeerHandler | None = None
        self.worker: ComputeWorker | None = None
        self.budget = CacheBudget(config.cache_tokens)
        self.block_speed = BlockThroughput(0.0, 0.0)
        self.start = self.end = 0
        self._stop: asyncio.Event | None = None
        self._looked_up: dict[str, float] = {}  # next hop -> when we read records for it
        self._loop: asyncio.AbstractEventLoop | None = None
        self.moves = 0
        self._cooldown_until = 0.0

    # ---- lifecycle ----------------------------------------------------------------------------

    def run(self) -> int:
        try:
            return loops.run(self._main())  # uvloop unless SWARM_MESH_EVENT_LOOP says (swarm.loops)
        finally:
            self.dht.shutdown()
            if self.relay is not None:
                self.relay.close()
            logger.info("stopped (%s)", self.peer_id)

    def stop(self) -> None:
        """Ask the peer to shut down (thread-safe)."""
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)

    async def _main(self) -> int:
        serial_torch()  # compute runs on the worker thread (and loading on its own): not here
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._loop.set_exception_handler(self._loop_error)
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                self._loop.add_signal_handler(sig, self._on_signal, sig)
        p2p = await self.dht.replicate_p2p()
        await self.dial_back.add_p2p_handlers(p2p)
        # Not for --train: its stages compute at once, and pinned they trained 7-22% slower.
        self.worker = ComputeWorker(pin=self.config.pin_threads == "auto" and not self.config.train)
        tasks: list[asyncio.Task] = []
        try:
            # Measured (or read from the cache) first, so even our "joining" record has a speed.
            self.block_speed = await in_own_thread(self._measure, "swarm-measure")
            start, end = await self._choose_span()
            if self._stop.is_set():
                return 0
            self.start, self.end = start, end
            await self.announcer.announce(self._record("joining"))
            backend = await self._load(start, end)
            self.handler = PeerHandler(
                backend, self.worker, self.budget, self.config, self.prefix, self.link
            )
            self.handler.throughput = self._throughput()
            await self.handler.add_p2p_handlers(p2p)
            if self.reachability == "direct" and self.config.direct_port >= 0:
                self.announcer.direct_port = await self.handler.start_direct(
                    self.config.host, self.config.direct_port
                )
            self.handler.state = "online"
            await self.announcer.announce(self._record("online"))
            logger.info("serving blocks %d:%d of %s as %s", start, end, self.prefix, self.peer_id)
            tasks.append(asyncio.create_task(self.announcer.run(self._current_record)))
            self.peer_client = PeerClient(p2p, link=self.link)
            self.handler.pushes.opener = self._open_push_stream
            self.handler.pushes.refused = self.peer_client.refused
            pushes = self.handler.pushes
            pings = self.announcer.ping_loop(self.peer_client, self._fetch, pushes.warm)
            tasks.append(asyncio.create_task(pings))
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
                await self.handler.direct.close()
            self.worker.stop()
            await self.dial_back.shutdown()

    def _on_signal(self, sig: int) -> None:
        logger.info(
            "%s: stopping (announcing offline, finishing in-flight work for up to %.0f s)",
            signal.Signals(sig).name,
            self.config.shutdown_grace,
        )
        self._stop.set()

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        # Stopping cancels hivemind's stream handlers, and clients hang up on us: both are the
        # shutdown working, not errors worth a traceback.
        error = context.get("exception")
        quiet = (asyncio.CancelledError, ConnectionResetError, BrokenPipeError)
        if self._stop is not None and self._stop.is_set() and isinstance(error, quiet):
            logger.debug("while stopping: %s", context.get("message"))
            return
        loop.default_exception_handler(context)

    async def _shutdown(self) -> None:
        """Preemption: announce offline at once, refuse new sessions, finish in-flight work."""
        handler = self.handler
        handler.draining = True
        handler.state = "offline"
        await self.announcer.announce(self._record("offline"))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.shutdown_grace
        while (handler.inflight or handler.sessions) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if handler.sessions:
            n = len(handler.sessions)
            logger.info("dropping %d session%s after the grace period", n, "s" * (n != 1))
        await handler.close_all_sessions()

    # ---- span choice and loading --------------------------------------------------------------
    async def _choose_span(self) -> tuple[int, int]:
        fixed = self.config.span()
        if fixed is not None:
            return fixed
        # Peers started together would all see the same swarm: spread their choices in time.
        delay = self.rng.uniform(0, self.config.max_start_delay)
        with contextlib.suppress(asyncio.TimeoutError):
            await loops.within(self._stop.wait(), delay)
        return await self._place(await self._fetch())

    async def _place(self, records: list[SpanRecord]) -> tuple[int, int]:
        """The span `--stage auto` serves, given the swarm's records (ours excluded here)."""
        spans = [r for r in records if r.peer_id != self.peer_id]
        start, end = balancer.choose_span(spans, self.num_layers, self.span_length, self.rng)
        n = len({r.peer_id for r in spans})
        logger.info("chose blocks %d:%d (%d other peer%s announced)", start, end, n, "s" * (n != 1))
        return start, end

    async def _load(self, start: int, end: int) -> SpanBackend:
        load = functools.partial(
            load_span,
            self.source,
            start,
            end,
            quant=self.config.quant,
            dtype=self.dtype,
            progress=False,
        )
        return SpanBackend(await in_own_thread(load, "swarm-load"), self.dtype)

    def _measure(self) -> BlockThroughput:
        """One block's speed on this machine: cached, else timed on a random block of this shape."""
        span = BlockSpan(self.model_config, 0, 1).to(self.dtype)
        quantize_blocks_as(span.blocks[0], self.config.quant)
        return get_block_throughput(
            self.prefix, span, self.config.quant, self.dtype, self.config.throughput_cache
        )

    def _throughput(self) -> float:
        # Tokens/s through each of our blocks while we serve all of them.
        return self.block_speed.forward_tps / max(1, self.end - self.start)

    # ---- announcing (swarm.peer.announcer stores what these build) ----------------------------
    def _record(self, state: str, start: int | None = None, end: int | None = None) -> SpanRecord:
        """Our record in `state`: for the span we serve, or for start:end while moving there."""
        start = self.start if start is None else start
        end = self.end if end is None else end
        codecs = self.handler.codecs if self.handler else ()
        if self.relay is not None:
            # A relay that died drops out; an empty list keeps the last addrs (better than none).
            addrs = tuple(self.relay.circuit_addrs()) or self.announcer.addrs
            if addrs != self.announcer.addrs:
                logger.info("relays changed; announcing %s", ", ".join(addrs))
            self.announcer.addrs = addrs
        return self.announcer.record(state, start, end, self.block_speed, self.budget.left, codecs)

    def _current_record(self) -> SpanRecord:
        return self._record(self.handler.state)

    async def _open_push_stream(self, peer, name: str, timeout: float):
        """A push stream to a next hop, on its direct channel when it has one. A next hop
        without a known channel makes us read the swarm's records first (at most once per
        LOOKUP_PERIOD): the last ones we read may predate its channel, or it."""
        key = peer.to_base58()
        now = asyncio.get_running_loop().time()
        if (
            key not in self.peer_client.direct
            and now - self._looked_up.get(key, -LOOKUP_PERIOD) >= LOOKUP_PERIOD
        ):
            self._looked_up[key] = now
            try:
                await loops.within(self._fetch(), timeout / 2)
            except Exception as e:  # libp2p then, as if it had none
                logger.debug("reading the records for next hop %s failed: %r", peer, e)
        return await self.peer_client.open_stream(peer, name, timeout)

    async def _fetch(self) -> list[SpanRecord]:
        records = await fetch_swarm_async(
            self.dht, self.prefix, self.num_layers, timeout=self.config.dht_timeout
        )
        if self.peer_client is not None:
            self.peer_client.learn_addrs(records)  # to ping relayed peers after our span
        return records

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
        spans = [r for r in records if r.end <= self.num_layers]
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
        await self.announcer.announce(self._record("joining", start, end))
        backend = await self._load(start, end)
        # Sessions opened on the old span keep their backend and finish there.
        self.handler.backend = backend
        self.start, self.end = start, end
        self.handler.throughput = self._throughput()
        await self.announcer.announce(self._record("online"))
        gone = [b for b in range(old_start, old_end) if not start <= b < end]
        if gone:
            tomb = self._record("offline", old_start, old_end)
            await self.announcer.announce(tomb, blocks=gone)
        self.moves += 1
        self._cooldown_until = self._loop.time() + 2 * self.config.rebalance_period
        logger.info("now serving blocks %d:%d", start, end)
