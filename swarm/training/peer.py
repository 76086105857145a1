"""A training peer: the serving peer with a trainable stage as backend, and training rebalancing.

Used by `swarm-peer join --train --run-id NAME` (the CLI picks this class when --train is given).
"""

from __future__ import annotations

import asyncio
import logging
import time

from swarm.errors import NoRoute
from swarm.peer.backend import SpanBackend
from swarm.peer.server import Peer
from swarm.training.progress import check_run_id, fetch_progress
from swarm.training.rebalance import choose_stages, training_join, training_move
from swarm.training.stage import StageTrainingConfig, TrainableStage, stage_averager

logger = logging.getLogger(__name__)

STAY_LOG_PERIOD = 10.0  # seconds between log lines saying why a peer stays on its stage


class TrainingPeer(Peer):
    """Serves its span with fp32 trainable weights; joins its stage's replicas on start.

    With `--stage auto` it joins the bottleneck stage of the run (the one with the least
    measured throughput; while nothing is measured, the fewest replicas per block), or fills a
    gap when the stages do not cover the model yet. It then periodically compares the stages'
    throughput (from the progress records on the DHT) and moves from a stage with spare
    throughput to the bottleneck, downloading the new stage's state before it serves there.
    """

    def __init__(self, config, on_maddrs=None, stage_config: StageTrainingConfig | None = None):
        if config.quant != "none":
            raise ValueError(
                "--train needs --quant none: training keeps fp32 master weights "
                f"(got --quant {config.quant}; int8 is the default for serving only)"
            )
        check_run_id(config.run_id)
        super().__init__(config, on_maddrs)
        self.stage_config = stage_config or StageTrainingConfig(
            run_id=config.run_id,
            optim_8bit=config.optim_8bit,
            matchmaking_time=config.matchmaking_time,
            dht_timeout=config.dht_timeout,
            max_lr=config.max_lr,
            trainers=tuple(config.run_trainers),
        )
        self._told_stay = float("-inf")  # when we last logged why we stay

    async def _load(self, start: int, end: int) -> SpanBackend:
        # Before the weights load (its process forks), on the main thread (it sets a signal
        # handler when it starts).
        averager = stage_averager(self.model_config, start, end, self.dht, self.stage_config)
        served = await super()._load(start, end)
        stage = TrainableStage(served.span, self.dht, self.stage_config, averager)
        # Download the stage's current state before we announce ourselves online.
        await asyncio.to_thread(stage.join)
        stage.queue_length = lambda: self.handler.inflight if self.handler is not None else 0
        return stage

    async def _shutdown(self) -> None:
        await super()._shutdown()
        backend = self.handler.backend if self.handler is not None else None
        if isinstance(backend, TrainableStage):
            await asyncio.to_thread(backend.shutdown)

    async def _move(self, start: int, end: int) -> None:
        old = self.handler.backend
        await super()._move(start, end)
        if isinstance(old, TrainableStage) and old is not self.handler.backend:
            # Up to a few rounds (later steps' buckets): gradients sent here are not dropped.
            wait = 3 * self.stage_config.averaging_timeout
            if not await asyncio.to_thread(old.finish, wait):
                logger.warning("left stage %s:%s holding gradients: trainers resend them", *old.key)
            await asyncio.to_thread(old.shutdown)

    async def _stage_speeds(self, keys: list[tuple[int, int]]) -> list[float]:
        """Summed samples/s of each stage's replicas, from their progress records (0: unknown)."""
        speeds = []
        for key in keys:
            progress = await asyncio.to_thread(
                fetch_progress, self.dht, self.stage_config.run_id, key, self.config.dht_timeout
            )
            speeds.append(sum(r.throughput for r in (progress or {}).values()))
        return speeds

    async def _place(self, records) -> tuple[int, int]:
        others = [r for r in records if r.peer_id != self.peer_id]
        try:
            # Peers still loading count: their stage is chosen. Started beside them (the README's
            # run), an auto peer saw only the first online and took a span across both stages.
            chain = choose_stages(others, self.num_layers, ("online", "joining"))
        except NoRoute:  # the stages do not cover the model yet: fill a gap
            return await super()._place(records)
        keys = [k for k, _ in chain]
        speeds = await self._stage_speeds(keys)
        replicas = [len(p) for _, p in chain]
        target = training_join(keys, speeds, replicas)
        logger.info(
            "joining training stage %d:%d (stages %s, replicas %s, samples/s %s)",
            *target,
            [f"{a}:{b}" for a, b in keys],
            replicas,
            [round(s, 1) for s in speeds],
        )
        return target

    def _tell_stay(self, why: str, *args) -> None:
        """Log why we stay on our stage, at most every STAY_LOG_PERIOD seconds."""
        now = time.monotonic()
        if now - self._told_stay >= STAY_LOG_PERIOD:
            self._told_stay = now
            msg = "training rebalance: staying on %d:%d (" + why + ")"
            logger.info(msg, self.start, self.end, *args)

    async def _maybe_move(self) -> bool:
        if self.handler is None or self.handler.draining:
            return False
        me = self.handler.backend
        if not isinstance(me, TrainableStage):
            return await super()._maybe_move()
        records = await self._fetch()
        try:
            chain = choose_stages(records, self.num_layers)
        except Exception as e:  # no full chain yet: nothing to balance
            self._tell_stay("no chain of stages in the records read: %s", e)
            return False
        keys = [k for k, _ in chain]
        if (self.start, self.end) not in keys:
            return False
        speeds = await self._stage_speeds(keys)
        mine = keys.index((self.start, self.end))
        replicas = [len(p) for _, p in chain]
        target = training_move(keys, speeds, replicas, mine, me.throughput, self.config.min_gain)
        if target is None:
            self._tell_stay(
                "stages %s, replicas %s, samples/s %s, ours %.1f",
                [f"{a}:{b}" for a, b in keys],
                replicas,
                [round(s, 1) for s in speeds],
                me.throughput,
            )
            return False
        logger.info("training rebalance: stage %s -> %s", keys[mine], target)
        await self._move(*target)
        return True
