"""The SWARM trainer: embeddings and head here, microbatches through stage replicas, retries.

Used by `swarm-train` and the training benchmark.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from hivemind import DHT

from swarm.errors import BadRequest, NoRoute, SwarmError
from swarm.model.loading import load_client_parts, load_config, load_tokenizer, resolve_model
from swarm.peer.client import PeerClient
from swarm.peer.dht_view import fetch_swarm_async
from swarm.peer.records import SpanRecord, block_key
from swarm.training.data import ByteTokenizer, TokenWindows, split_microbatches
from swarm.training.optim8bit import AdamConfig, AdamW
from swarm.training.progress import (
    TrainerRecord,
    check_run_id,
    fetch_progress,
    store_trainer,
)
from swarm.training.wiring import BACKWARD_TASK_FACTOR, NoReplica, StochasticWiring

logger = logging.getLogger(__name__)


# A replica's progress record must be absent this long before its microbatches are resent.
MISSING_GRACE_S = 2.0


@dataclass
class TrainerConfig:
    """Settings of `swarm-train`; the CLI reads its defaults here."""

    model: str = "smollm2-135m"
    initial_peers: list[str] = field(default_factory=list)
    data: list[str] = field(default_factory=list)
    steps: int = 10
    batch_size: int = 8  # sequences per step, over all microbatches
    seq_len: int = 64
    microbatches: int = 2
    run_id: str = "swarm"
    lr: float = 1e-3
    weight_decay: float = 0.0
    optim_8bit: bool = False
    compression: str = "none"  # codec of activations and gradients, both ways
    seed: int = 0
    forward_timeout: float = 30.0  # SWARM's values
    backward_timeout: float = 75.0
    max_attempts: int = 8  # per stage call: how many replicas we try before a microbatch is lost
    ban_s: float = 15.0  # a failed replica is skipped this long
    step_timeout: float = 120.0  # bound on waiting for the stages to step together
    stall_timeout: float = 120.0  # longest a stage may have no callable replica
    dht_timeout: float = 10.0
    save: str | None = None  # folder for a Hugging Face-style checkpoint at the end

    def validate(self) -> None:
        check_run_id(self.run_id)
        for name in ("steps", "batch_size", "seq_len", "microbatches", "max_attempts"):
            if getattr(self, name) <= 0:
                raise BadRequest(f"--{name.replace('_', '-')} must be positive")
        if not self.data:
            raise BadRequest("give at least one --data file")


@dataclass
class StepStats:
    step: int
    loss: float
    samples_per_s: float
    retries: int
    resent: int
    lost: int


@dataclass
class _Held:
    """What the trainer keeps of one microbatch at one stage until the stage has stepped."""

    inputs: torch.Tensor
    grad_out: torch.Tensor


class Trainer:
    """Holds the client parts (trained here) and drives microbatches through the swarm's stages.

    Create it before any event loop runs in the process (it starts a DHT, which forks).
    """

    def __init__(self, config: TrainerConfig) -> None:
        config.validate()
        self.config = config
        self.source = resolve_model(config.model)
        self.model_config = load_config(self.source)
        self.prefix = self.source.name
        self.client_parts = load_client_parts(self.source).float().train()
        for p in self.client_parts.parameters():
            p.requires_grad_(True)
        self.adam = AdamConfig(lr=config.lr, weight_decay=config.weight_decay)
        self.optimizer = AdamW(
            list(self.client_parts.parameters()), self.adam, eight_bit=config.optim_8bit
        )
        try:
            tokenizer = load_tokenizer(self.source)
        except (SwarmError, OSError, ValueError) as e:
            logger.warning("no tokenizer (%s): training on UTF-8 bytes", e)
            tokenizer = ByteTokenizer(self.model_config.vocab_size)
        self.data = TokenWindows.from_files(
            tokenizer, config.data, config.seq_len, self.model_config.vocab_size
        )
        self.dht = DHT(
            initial_peers=config.initial_peers or None,
            host_maddrs=["/ip4/127.0.0.1/tcp/0"],
            start=True,
        )
        self.trainer_id = f"trainer-{uuid.uuid4().hex[:12]}"
        self.wiring = StochasticWiring(random.Random(config.seed))
        self.stages: list[tuple[int, int]] = []
        self.retries = self.resent = self.lost = 0
        self.samples_done = 0
        self.wire_bytes = 0  # tensor payload of successful calls, all four directions
        self.history: list[StepStats] = []

    # Discovery

    async def refresh_stages(self) -> None:
        """Re-read the swarm: a chain of spans from block 0 to the last, with their replicas."""
        try:
            records = await fetch_swarm_async(
                self.dht, self.prefix, self.model_config.num_layers, self.config.dht_timeout
            )
        except Exception as e:  # fall back to plain DHT reads if the batched view fails
            logger.debug("fetch_swarm failed (%r); reading block records one by one", e)
            records = await asyncio.to_thread(
                read_span_records,
                self.dht,
                self.prefix,
                self.model_config.num_layers,
                self.config.dht_timeout,
            )
        stages = choose_stages(records, self.model_config.num_layers)
        self.stages = [key for key, _ in stages]
        for index, (_, peers) in enumerate(stages):
            self.wiring.set_peers(index, peers)

    async def wait_for_swarm(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                await self.refresh_stages()
                return
            except (NoRoute, SwarmError) as e:
                if time.monotonic() > deadline:
                    raise NoRoute(f"no chain of training peers covers the model: {e}") from e
                await asyncio.sleep(1.0)

    # One call to one stage, retried on other replicas

    async def _call(self, client: PeerClient, stage: int, kind: str, *tensors) -> tuple:
        start, end = self.stages[stage]
        n = tensors[0].shape[0]
        task = n * (BACKWARD_TASK_FACTOR if kind == "backward" else 1.0)
        last_error: Exception | None = None
        failures = 0
        # Two bounds: failed calls (max_attempts) and time with no replica to call at all.
        deadline = time.monotonic() + self.config.stall_timeout
        while failures < self.config.max_attempts:
            try:
                peer = self.wiring.choose(stage, time.monotonic(), task)
            except NoReplica as e:
                last_error = e
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(1.0)  # replicas are banned or restarting: look again
                try:
                    await self.refresh_stages()
                except SwarmError as e2:
                    last_error = e2
                continue
            t0 = time.monotonic()
            try:
                if kind == "forward":
                    out = await client.forward(
                        peer, tensors[0], start, end, timeout=self.config.forward_timeout
                    )
                else:
                    out = await client.backward(
                        peer,
                        tensors[0],
                        tensors[1],
                        start,
                        end,
                        timeout=self.config.backward_timeout,
                    )
            except SwarmError as e:
                last_error = e
                failures += 1
                self.retries += 1
                self.wiring.report_failure(peer, time.monotonic(), self.config.ban_s)
                logger.info("%s at stage %d:%d failed on %s: %s", kind, start, end, peer, e)
                continue
            self.wiring.report_success(peer, task, time.monotonic() - t0)
            codec = self.config.compression
            self.wire_bytes += sum(payload_bytes(t, codec) for t in (*tensors, out))
            return out, peer
        raise NoRoute(
            f"{kind} at stage {start}:{end} failed {failures} times "
            f"(no replica for up to {self.config.stall_timeout:.0f} s): {last_error}"
        )

    async def _microbatch(
        self, client: PeerClient, ids: torch.Tensor, held: list[dict[str, list[_Held]]]
    ) -> float | None:
        """Forward and backward of one microbatch; its loss, or None if it was lost."""
        n = ids.shape[0]
        try:
            h0 = self.client_parts.embed(ids)
            inputs = [h0.detach()]
            h = inputs[0]
            for s in range(len(self.stages)):
                h, _ = await self._call(client, s, "forward", h)
                inputs.append(h)
            last = inputs[-1].clone().requires_grad_(True)
            logits = self.client_parts.logits(last)
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
            )
            # Sum of per-sequence mean losses: every side divides by the samples it holds.
            (loss * n).backward()
            grad = last.grad
            for s in reversed(range(len(self.stages))):
                grad_in, peer = await self._call(client, s, "backward", inputs[s], grad)
                held[s][peer].append(_Held(inputs[s], grad))
                grad = grad_in
            h0.backward(grad)
            return float(loss.detach())
        except NoRoute as e:
            logger.warning("microbatch lost: %s", e)
            self.lost += 1
            return None

    # Waiting for the stages to step together

    async def _stage_epochs(self) -> list[dict[str, int] | None]:
        """Per stage: peer id -> epoch of each live replica (None where the DHT did not answer)."""

        async def one(key: tuple[int, int]) -> dict[str, int] | None:
            recs = await asyncio.to_thread(
                fetch_progress, self.dht, self.config.run_id, key, self.config.dht_timeout
            )
            return None if recs is None else {p: r.epoch for p, r in recs.items()}

        return list(await asyncio.gather(*(one(key) for key in self.stages)))

    async def _wait_for_stages(
        self,
        client: PeerClient,
        before: list[dict[str, int]],
        held: list[dict[str, list[_Held]]],
    ) -> None:
        """Wait until every live replica of every stage has stepped past its epoch at step start.

        A replica that died holding this step's gradients (its progress record expired before its
        stage stepped) has those microbatches' backward resent to a live replica: no microbatch
        is lost, and none counts twice because the dead replica's gradients died with it.
        """
        base = [max((b or {}).values(), default=-1) for b in before]
        deadline = time.monotonic() + self.config.step_timeout
        missing_since: dict[tuple[int, str], float] = {}
        while time.monotonic() < deadline:
            epochs = await self._stage_epochs()
            done = True
            now = time.monotonic()
            for s, live in enumerate(epochs):
                if live is None:
                    done = False  # the DHT did not answer: judge nothing on this read
                    continue
                if live and all(e > base[s] for e in live.values()):
                    continue
                if not live and base[s] < 0:
                    continue  # not a training stage (no progress records): nothing to wait for
                done = False
                if any(e > base[s] for e in live.values()):
                    continue  # the stage stepped; stragglers follow
                for peer in list(held[s]):
                    if peer in live:
                        missing_since.pop((s, peer), None)
                        continue
                    # A record may miss one read (DHT lag): resend only when it stays gone.
                    first_missed = missing_since.setdefault((s, peer), now)
                    if now - first_missed < MISSING_GRACE_S:
                        continue
                    items = held[s].pop(peer)
                    logger.info(
                        "replica %s of stage %s is gone: resending %d backward",
                        peer,
                        self.stages[s],
                        len(items),
                    )
                    for item in items:
                        try:
                            _, new_peer = await self._call(
                                client, s, "backward", item.inputs, item.grad_out
                            )
                        except NoRoute as e:
                            logger.warning("resend failed: %s", e)
                            self.lost += 1
                            continue
                        held[s][new_peer].append(item)
                        self.resent += 1
            if done:
                return
            await asyncio.sleep(0.2)
        logger.warning("stages did not all step within %.0f s", self.config.step_timeout)

    # The loop

    async def run(self, on_step=None) -> list[StepStats]:
        """Train for `config.steps` steps; `on_step(StepStats)` is called after each."""
        cfg = self.config
        p2p = await self.dht.replicate_p2p()
        client = PeerClient(p2p, cfg.compression)
        await self.wait_for_swarm(timeout=60.0)
        record = TrainerRecord(self.trainer_id, cfg.batch_size, self.adam)
        await asyncio.to_thread(store_trainer, self.dht, cfg.run_id, record, 30.0, cfg.dht_timeout)
        # Stages read trainer records every second or two: let them learn the target batch.
        await asyncio.sleep(2.5)
        batches = self.data.batches(cfg.batch_size, cfg.seed)
        try:
            for step in range(1, cfg.steps + 1):
                t0 = time.monotonic()
                retries0 = self.retries
                try:
                    await self.refresh_stages()
                except SwarmError as e:
                    logger.warning("swarm incomplete (%s); waiting for peers", e)
                    await self.wait_for_swarm(self.config.stall_timeout)
                await asyncio.to_thread(
                    store_trainer, self.dht, cfg.run_id, record, 30.0, cfg.dht_timeout
                )
                before = await self._stage_epochs()
                held: list[dict[str, list[_Held]]] = [defaultdict(list) for _ in self.stages]
                batch = next(batches)
                mbs = split_microbatches(batch, cfg.microbatches)
                losses = await asyncio.gather(*(self._microbatch(client, mb, held) for mb in mbs))
                ok = [
                    (loss, mb.shape[0])
                    for loss, mb in zip(losses, mbs, strict=True)
                    if loss is not None
                ]
                n_ok = sum(n for _, n in ok)
                if n_ok:
                    with torch.no_grad():
                        for p in self.client_parts.parameters():
                            if p.grad is not None:
                                p.grad /= n_ok
                    self.optimizer.step()
                self.client_parts.zero_grad(set_to_none=True)
                t_wait = time.monotonic()
                await self._wait_for_stages(client, before, held)
                logger.info(
                    "step %d: compute %.2fs, waiting for stages %.2fs",
                    step,
                    t_wait - t0,
                    time.monotonic() - t_wait,
                )
                elapsed = time.monotonic() - t0
                self.samples_done += n_ok
                loss = sum(x * n for x, n in ok) / n_ok if n_ok else float("nan")
                stats = StepStats(
                    step, loss, n_ok / elapsed, self.retries - retries0, self.resent, self.lost
                )
                self.history.append(stats)
                if on_step is not None:
                    on_step(stats)
        finally:
            # A tombstone so that stages stop counting our batch size.
            await asyncio.to_thread(
                _retract, self.dht, cfg.run_id, self.trainer_id, cfg.dht_timeout
            )
        return self.history

    def shutdown(self) -> None:
        self.dht.shutdown()


def payload_bytes(x: torch.Tensor, codec: str) -> int:
    """Bytes a tensor takes on the wire under `codec` (codes plus bf16 scales, no headers)."""
    if codec in ("", "none"):
        return x.numel() * x.element_size()
    from kernels.codecs import parse_codec

    spec = parse_codec(codec)
    return x.numel() * spec.code_dtype(x.dtype).itemsize + 2 * spec.num_scales(tuple(x.shape))


def _retract(dht: DHT, run_id: str, trainer_id: str, timeout: float) -> None:
    from hivemind.utils.timed_storage import get_dht_time

    from swarm.training.progress import run_key

    try:
        dht.store(
            run_key(run_id), None, get_dht_time() + 60, subkey=trainer_id, return_future=True
        ).result(timeout=timeout)
    except Exception as e:  # best effort: the record expires anyway
        logger.debug("could not retract trainer record: %r", e)


def read_span_records(dht: DHT, prefix: str, num_blocks: int, timeout: float) -> list[SpanRecord]:
    """Every peer's freshest span record, read key by key (a fallback of `fetch_swarm`)."""
    best: dict[str, tuple[float, SpanRecord]] = {}
    for block in range(num_blocks):
        try:
            found = dht.get(block_key(prefix, block), latest=True, return_future=True).result(
                timeout=timeout
            )
        except Exception as e:
            raise NoRoute(f"the DHT did not answer for block {block}: {e!r}") from e
        if found is None or not isinstance(found.value, dict):
            continue
        for subkey, item in found.value.items():
            try:
                rec = SpanRecord.from_wire(subkey, item.value)
            except (ValueError, TypeError):
                continue
            if subkey not in best or item.expiration_time > best[subkey][0]:
                best[subkey] = (item.expiration_time, rec)
    return [r for _, r in best.values()]


def choose_stages(
    records: list[SpanRecord], num_layers: int
) -> list[tuple[tuple[int, int], list[str]]]:
    """A chain of spans [0, a), [a, b), ... [z, num_layers) and each span's online peers.

    At each block the span with the most replicas wins (ties: the longer one). Raises NoRoute if
    online peers do not cover the model.
    """
    by_span: dict[tuple[int, int], list[str]] = defaultdict(list)
    for r in records:
        if r.state == "online" and r.end <= num_layers:
            by_span[(r.start, r.end)].append(r.peer_id)
    chain, pos = [], 0
    while pos < num_layers:
        options = [(k, v) for k, v in by_span.items() if k[0] == pos]
        if not options:
            raise NoRoute(f"no online training peer serves a span starting at block {pos}")
        key, peers = max(options, key=lambda kv: (len(kv[1]), kv[0][1]))
        chain.append((key, sorted(peers)))
        pos = key[1]
    return chain
