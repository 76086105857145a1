"""The SWARM trainer: embeddings and head here, microbatches through stage replicas, retries.

Used by `swarm-train` (and through it the training benchmark, tests and churn harness).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from hivemind import DHT

from swarm.dht import make_dht
from swarm.errors import BadRequest, NoRoute, SwarmError
from swarm.loops import within
from swarm.model.loading import load_client_parts, load_config, load_tokenizer, resolve_model
from swarm.model.tokenizer import Tokenizer
from swarm.net import check_initial_peers
from swarm.peer.client import PeerClient
from swarm.peer.dht_view import fetch_swarm_async
from swarm.training.data import ByteTokenizer, TokenWindows, split_microbatches
from swarm.training.optim8bit import AdamConfig, AdamW
from swarm.training.progress import (
    ReplicaProgress,
    TrainerRecord,
    check_run_id,
    fetch_progress,
    fetch_trainers,
    store_trainer,
)
from swarm.training.rebalance import choose_stages
from swarm.training.wiring import BACKWARD_TASK_FACTOR, FixedWiring, NoReplica, StochasticWiring

logger = logging.getLogger(__name__)


class NoRunPeers(NoRoute):
    """The run's training peers do not cover the model (yet, if `loading`: some still load)."""

    def __init__(self, message: str, loading: bool = False) -> None:
        super().__init__(message)
        self.loading = loading


# A replica's progress record must be absent this long before its microbatches are resent.
MISSING_GRACE_S = 2.0
NOTE_EVERY_S = 10.0  # a wait this long or longer is reported on stderr, again every as long
# Our trainer record lives RECORD_TTL_S and is refreshed every RECORD_REFRESH_S, whatever the run
# waits for: stages take a lapsed record for the end of the run and step on all they hold.
RECORD_TTL_S = 30.0
RECORD_REFRESH_S = 10.0


@dataclass
class TrainerConfig:
    """Settings of `swarm-train`; the CLI reads its defaults and help here."""

    model: str = field(
        default="smollm2-135m", metadata={"help": "model name or checkpoint, as the peers'"}
    )
    initial_peers: list[str] = field(
        default_factory=list, metadata={"help": "multiaddrs of peers of the swarm (required)"}
    )
    data: list[str] = field(default_factory=list, metadata={"help": "text files to train on"})
    steps: int = field(default=10, metadata={"help": "optimizer steps to run"})
    batch_size: int = field(
        default=8, metadata={"help": "sequences this trainer sends per optimizer step"}
    )
    seq_len: int = field(default=64, metadata={"help": "tokens per sequence"})
    microbatches: int = field(
        default=2, metadata={"help": "microbatches per trainer step, pipelined through the stages"}
    )
    target_batch: int = field(
        default=0,
        metadata={
            "help": "the run's global batch per optimizer step, summed over trainers "
            "(0: the sum of the live trainers' --batch-size)"
        },
    )
    sync: bool = field(
        default=False,
        metadata={
            "help": "lock-step: every step waits for the stages to average (equals "
            "single-process training); default: averaging in the background, one step stale"
        },
    )
    average_every: int = field(
        default=1,
        metadata={
            "help": "optimizer steps between averaging rounds (H > 1: DiLoCo local steps and "
            "an outer Nesterov step on the averaged deltas)"
        },
    )
    outer_lr: float = field(default=0.7, metadata={"help": "DiLoCo outer learning rate"})
    outer_momentum: float = field(default=0.9, metadata={"help": "DiLoCo outer Nesterov momentum"})
    max_inflight: int = field(
        default=0,
        metadata={"help": "most microbatches in flight at once (0: two steps' worth)"},
    )
    wiring: str = field(
        default="stochastic",
        metadata={
            "choices": ("stochastic", "fixed"),
            "help": "stochastic (SWARM: any replica, by measured speed) or fixed (pipelines: "
            "lane i always uses replica i of each stage, the baseline)",
        },
    )
    run_id: str = field(default="swarm", metadata={"help": "name of the run (the peers' --run-id)"})
    # Fine-tuning a pretrained model: 1e-3 made SmolLM2's loss rise, 1e-4 with warm-up falls.
    lr: float = field(default=1e-4, metadata={"help": "AdamW learning rate (used by every stage)"})
    warmup_steps: int = field(
        default=5, metadata={"help": "steps over which the learning rate rises to --lr"}
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    optim_8bit: bool = field(
        default=False, metadata={"help": "keep the trainer's AdamW moments in 8 bits"}
    )
    compression: str = field(
        default="none",
        metadata={"help": "codec of activations and gradients both ways (none, int8-block64, ...)"},
    )
    seed: int = field(default=0, metadata={"help": "seed of data order and replica choice"})
    forward_timeout: float = field(  # SWARM's values
        default=30.0, metadata={"help": "seconds before a forward call is retried elsewhere"}
    )
    backward_timeout: float = field(
        default=75.0, metadata={"help": "seconds before a backward call is retried elsewhere"}
    )
    max_attempts: int = field(
        default=8, metadata={"help": "replicas tried per stage call before a microbatch is lost"}
    )
    ban_s: float = field(default=15.0, metadata={"help": "seconds a failed replica is skipped"})
    step_timeout: float = field(
        default=120.0, metadata={"help": "most seconds to wait for the stages to step"}
    )
    stall_timeout: float = field(
        default=120.0,
        metadata={"help": "most seconds a stage may have no replica to call before work is lost"},
    )
    join_timeout: float = field(
        default=20.0,
        metadata={"help": "most seconds to wait at start for training peers of the run"},
    )
    dht_timeout: float = field(default=10.0, metadata={"help": "bound on each DHT read or write"})
    identity: str | None = field(
        default=None,
        metadata={
            "help": "private key file (created if missing): keeps this trainer's peer id, the "
            "one stages list in --run-trainers, across runs"
        },
    )
    save: str | None = field(
        default=None,
        metadata={
            "help": "write a Hugging Face-style checkpoint folder here at the end (with the "
            "tokenizer: swarm-generate --local --model DIR runs it)"
        },
    )

    def validate(self) -> None:
        check_run_id(self.run_id)
        for name in ("steps", "batch_size", "seq_len", "microbatches", "max_attempts"):
            if getattr(self, name) <= 0:
                raise BadRequest(f"--{name.replace('_', '-')} must be positive")
        if self.target_batch < 0 or self.max_inflight < 0 or self.warmup_steps < 0:
            raise BadRequest("--target-batch, --max-inflight and --warmup-steps must be >= 0")
        if self.average_every < 1:
            raise BadRequest("--average-every must be at least 1")
        if self.sync and self.average_every > 1:
            raise BadRequest("--sync averages every step: it cannot take --average-every")
        if self.wiring not in ("stochastic", "fixed"):
            raise BadRequest(f"--wiring must be stochastic or fixed, not {self.wiring!r}")
        if not self.data:
            raise BadRequest("give at least one --data file")
        if not self.initial_peers:
            raise BadRequest(
                "give --initial-peers: the multiaddr a training peer printed "
                "(swarm-peer join --train --run-id ...)"
            )
        check_initial_peers(self.initial_peers)
        # Stages ignore a record out of their bounds: refuse it here rather than be ignored there.
        adam = AdamConfig(
            lr=self.lr, weight_decay=self.weight_decay, warmup_steps=self.warmup_steps
        )
        wire = TrainerRecord(
            "this",
            self.batch_size,
            adam,
            self.target_batch,
            self.sync,
            self.average_every,
            self.outer_lr,
            self.outer_momentum,
        ).to_wire()
        TrainerRecord.from_wire("this trainer (--lr, --batch-size, --outer-lr ...)", wire)


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
    """What the trainer keeps of one microbatch at one stage until the stage has stepped on it."""

    inputs: torch.Tensor
    grad_out: torch.Tensor
    step: int = 0  # the stage's optimizer step it counts toward (0: unknown)
    lane: int = 0


@dataclass
class _StepAcc:
    """One trainer step in asynchronous mode: its microbatches' client gradients and losses."""

    expected: int
    done: int = 0
    samples: int = 0
    loss_sum: float = 0.0
    grads: dict[int, torch.Tensor] = field(default_factory=dict)  # id(param) -> summed grad

    def add(self, params, grads) -> None:
        for p, g in zip(params, grads, strict=True):
            have = self.grads.get(id(p))
            self.grads[id(p)] = g.detach().clone() if have is None else have.add_(g)


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
        self.adam = AdamConfig(
            lr=config.lr, weight_decay=config.weight_decay, warmup_steps=config.warmup_steps
        )
        self.optimizer = AdamW(
            list(self.client_parts.parameters()), self.adam, eight_bit=config.optim_8bit
        )
        self.tokenizer: Tokenizer | None = None  # what --save writes beside the weights
        try:
            self.tokenizer = load_tokenizer(self.source)
        except (SwarmError, OSError, ValueError) as e:
            logger.warning("no tokenizer (%s): training on UTF-8 bytes", e)
        self.data = TokenWindows.from_files(
            self.tokenizer or ByteTokenizer(self.model_config.vocab_size),
            config.data,
            config.seq_len,
            self.model_config.vocab_size,
        )
        self.dht = make_dht(
            initial_peers=config.initial_peers,
            host_maddrs=["/ip4/127.0.0.1/tcp/0"],
            identity_path=config.identity,
            start=True,
        )
        self.trainer_id = self.dht.peer_id.to_base58()  # its records are signed by this key
        # Fixed pipelines learn their count from the swarm on the first look (refresh_stages).
        self.wiring: Any = StochasticWiring(random.Random(config.seed))
        self.stages: list[tuple[int, int]] = []
        self.retries = self.resent = self.lost = 0
        # Refreshing our trainer record while the run lasts (_keep_record): (task, its stop).
        self._record_keeper: tuple[asyncio.Task, asyncio.Event] | None = None
        self.samples_done = 0
        self.wire_bytes = 0  # tensor payload of successful calls, all four directions
        self.max_staleness = 0  # most optimizer steps a microbatch's stages ran ahead of it
        self.history: list[StepStats] = []
        self.epochs: list[int] = []  # asynchronous mode: each stage's epoch as last read
        self.pending: list[int] = []  # asynchronous mode: our samples each stage holds unapplied
        self._lane = 0
        self.stopping = False  # set by stop(): no new step starts

    def stop(self) -> None:
        """End the run early and cleanly: no new step starts, those begun finish and are applied
        by the stages, and run() returns what was done (swarm-train calls this on SIGINT/SIGTERM).
        """
        if not self.stopping:
            logger.warning("stopping: the steps begun finish, no new one starts")
        self.stopping = True

    # Discovery

    async def refresh_stages(self) -> None:
        """Re-read the swarm: the run's chain of spans from block 0 to the last, and replicas.

        Only peers that publish progress records of this run count: peers of another run (or
        serving peers) are never trained through. Raises NoRoute naming the run otherwise.
        """
        records = await fetch_swarm_async(
            self.dht, self.prefix, self.model_config.num_layers, self.config.dht_timeout
        )
        spans = sorted({(r.start, r.end) for r in records if r.state == "online"})
        progress = await asyncio.gather(*(self._progress(key) for key in spans))
        ours = {
            (key, peer)
            for key, found in zip(spans, progress, strict=True)
            for peer in (found or {})
        }
        mine = [r for r in records if ((r.start, r.end), r.peer_id) in ours]
        run = self.config.run_id
        if not mine:
            joining = [r for r in records if r.run_id == run and r.state == "joining"]
            others = sorted({r.run_id for r in records if r.run_id and r.run_id != run})
            raise NoRunPeers(
                f"no training peer of run {run!r} is ready"
                + (f" ({len(joining)} still loading)" if joining else "")
                + f"; {len({r.peer_id for r in records})} peers serve {self.prefix}"
                + (f", training runs {others}" if others else "")
                + f": start peers with `swarm-peer join --train --run-id {run}` or pass the "
                "--run-id they use",
                bool(joining),
            )
        loading = any(r.run_id == run and r.state == "joining" for r in records)
        try:
            stages = choose_stages(mine, self.model_config.num_layers)
        except NoRoute as e:
            raise NoRunPeers(f"the training peers of run {run!r}: {e}", loading) from None
        self.stages = [key for key, _ in stages]
        if self.config.wiring == "fixed" and not isinstance(self.wiring, FixedWiring):
            self.wiring = FixedWiring(pipelines=min(len(peers) for _, peers in stages))
        now = time.monotonic()
        for index, (_, peers) in enumerate(stages):
            self.wiring.set_peers(index, peers, now)

    async def _progress(self, key: tuple[int, int]) -> dict[str, ReplicaProgress] | None:
        return await asyncio.to_thread(
            fetch_progress, self.dht, self.config.run_id, key, self.config.dht_timeout
        )

    async def wait_for_swarm(self, timeout: float) -> None:
        """Wait up to `timeout` s for the run's chain; longer (stall_timeout) while peers of the
        run are still loading, so a trainer started with its peers does not give up on them."""
        t0 = time.monotonic()
        note_at = t0 + NOTE_EVERY_S
        while True:
            try:
                await self.refresh_stages()
                return
            except (NoRoute, SwarmError) as e:
                waited = time.monotonic() - t0
                loading = isinstance(e, NoRunPeers) and e.loading
                if waited > (max(timeout, self.config.stall_timeout) if loading else timeout):
                    raise NoRoute(f"{e} (waited {waited:.0f} s)") from None
                if time.monotonic() >= note_at:
                    note_at += NOTE_EVERY_S
                    logger.warning("waiting %.0f s for the run's peers: %s", waited, e)
                await asyncio.sleep(1.0)

    # One call to one stage, retried on other replicas

    async def _call(
        self, client: PeerClient, stage: int, kind: str, *tensors, lane: int = 0, step: int = 0
    ) -> tuple[torch.Tensor, str, int]:
        """(output, peer, step the stage counts a backward toward) of one forward or backward."""
        start, end = self.stages[stage]
        n = tensors[0].shape[0]
        task = n * (BACKWARD_TASK_FACTOR if kind == "backward" else 1.0)
        last_error: Exception | None = None
        failures = 0
        # Two bounds: failed calls (max_attempts) and time with no replica to call at all.
        deadline = time.monotonic() + self.config.stall_timeout
        while failures < self.config.max_attempts:
            try:
                peer = self.wiring.choose(stage, time.monotonic(), task, lane=lane)
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
            counted = 0
            try:
                if kind == "forward":
                    out = await client.forward(
                        peer, tensors[0], start, end, timeout=self.config.forward_timeout
                    )
                else:
                    out, counted = await client.backward_counted(
                        peer,
                        tensors[0],
                        tensors[1],
                        start,
                        end,
                        timeout=self.config.backward_timeout,
                        step=step,
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
            return out, peer, counted
        raise NoRoute(
            f"{kind} at stage {start}:{end} failed {failures} times "
            f"(no replica for up to {self.config.stall_timeout:.0f} s): {last_error}"
        )

    def _next_lane(self) -> int:
        self._lane += 1
        return self._lane - 1

    async def _microbatch(
        self, client: PeerClient, ids: torch.Tensor, held: list[dict[str, list[_Held]]]
    ) -> float | None:
        """Lock-step: forward and backward of one microbatch; its loss, or None if it was lost.

        Client gradients accumulate in `.grad` (the caller steps once per trainer step).
        """
        n = ids.shape[0]
        lane = self._next_lane()
        try:
            h0 = self.client_parts.embed(ids)
            inputs = [h0.detach()]
            h = inputs[0]
            for s in range(len(self.stages)):
                h, _, _ = await self._call(client, s, "forward", h, lane=lane)
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
                grad_in, peer, step = await self._call(
                    client, s, "backward", inputs[s], grad, lane=lane
                )
                held[s][peer].append(_Held(inputs[s], grad, step, lane))
                grad = grad_in
            h0.backward(grad)
            return float(loss.detach())
        except NoRoute as e:
            logger.warning("microbatch lost: %s", e)
            self.lost += 1
            return None

    # Lock-step mode: wait for the stages to step together

    async def _stage_epochs(self) -> list[dict[str, int] | None]:
        """Per stage: peer id -> epoch of each live replica (None where the DHT did not answer)."""
        found = await asyncio.gather(*(self._progress(key) for key in self.stages))
        return [None if recs is None else {p: r.epoch for p, r in recs.items()} for recs in found]

    async def _resend(
        self, client: PeerClient, s: int, peer: str, held: list[dict[str, list[_Held]]]
    ) -> None:
        """Resend the backward calls a vanished replica held to live replicas of stage s."""
        items = held[s].pop(peer, [])
        logger.info(
            "replica %s of stage %s is gone: resending %d backward",
            peer,
            self.stages[s],
            len(items),
        )
        for item in items:
            try:
                # With its step tag: counted toward the coming step instead, an item meant for
                # the next one (a bucket the replica held) left that step short of its batch.
                _, new_peer, step = await self._call(
                    client,
                    s,
                    "backward",
                    item.inputs,
                    item.grad_out,
                    lane=item.lane,
                    step=item.step,
                )
            except NoRoute as e:
                logger.warning("resend failed: %s", e)
                self.lost += 1
                if s < len(self.pending):
                    self.pending[s] -= item.inputs.shape[0]
                continue
            item.step = step
            held[s][new_peer].append(item)
            self.resent += 1

    async def _wait_for_stages(
        self,
        client: PeerClient,
        before: list[dict[str, int] | None],
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
                done = False
                if any(e > base[s] for e in live.values()):
                    continue  # the stage stepped; stragglers follow
                for peer in list(held[s]):
                    if peer in live:
                        missing_since.pop((s, peer), None)
                        continue
                    # A record may miss one read (DHT lag): resend only when it stays gone.
                    first_missed = missing_since.setdefault((s, peer), now)
                    if now - first_missed >= MISSING_GRACE_S:
                        await self._resend(client, s, peer, held)
            if done:
                return
            await asyncio.sleep(0.2)
        logger.warning("stages did not all step within %.0f s", self.config.step_timeout)

    async def _run_sync(self, client: PeerClient, record: TrainerRecord, on_step) -> None:
        cfg = self.config
        batches = self.data.batches(cfg.batch_size, cfg.seed)
        for step in range(1, cfg.steps + 1):
            if self.stopping:
                break
            t0 = time.monotonic()
            retries0 = self.retries
            try:
                await self.refresh_stages()
            except SwarmError as e:
                logger.warning("swarm incomplete (%s); waiting for peers", e)
                await self.wait_for_swarm(self.config.stall_timeout)
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

    # Asynchronous mode: microbatches in flight up to a bound, at most one step stale

    async def _microbatch_async(
        self,
        client: PeerClient,
        ids: torch.Tensor,
        acc: _StepAcc,
        held: list[dict[str, list[_Held]]],
        issued: list[int],
        tags: list[int],
    ) -> None:
        """One microbatch through the stages; client gradients go to `acc` (not `.grad`), since
        microbatches of two trainer steps are in flight at once.

        issued: each stage's epoch when it was sent, to measure how stale its gradients got.
        tags: per stage, the optimizer step its gradient is meant for.
        """
        n = ids.shape[0]
        lane = self._next_lane()
        cp = self.client_parts
        committed = 0  # stages, from the last, that counted its gradient
        try:
            with torch.no_grad():
                h = cp.embed(ids)
            inputs = [h]
            for s in range(len(self.stages)):
                h, _, _ = await self._call(client, s, "forward", h, lane=lane)
                inputs.append(h)
            # No await from here to the gradients: the head is not stepped in between.
            last = inputs[-1].clone().requires_grad_(True)
            head = [cp.norm.weight, cp.lm_head.weight]
            logits = cp.logits(last)
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
            )
            grads = torch.autograd.grad(loss * n, [last, *head])
            acc.add(head, grads[1:])
            grad = grads[0]
            for s in reversed(range(len(self.stages))):
                grad, peer, step = await self._call(
                    client, s, "backward", inputs[s], grad, lane=lane, step=tags[s]
                )
                held[s][peer].append(_Held(inputs[s], grad, step, lane))
                committed += 1
                if step and s < len(issued):
                    self.max_staleness = max(self.max_staleness, step - 1 - issued[s])
            # The embedding's gradient is a scatter of the input gradient onto its rows.
            emb = cp.embed_tokens.weight
            g_emb = torch.zeros_like(emb).index_add_(
                0, ids.reshape(-1), grad.reshape(-1, grad.shape[-1]).to(emb.dtype)
            )
            acc.add([emb], [g_emb])
            acc.samples += n
            acc.loss_sum += float(loss.detach()) * n
        except NoRoute as e:
            logger.warning("microbatch lost: %s", e)
            self.lost += 1
            for s in range(len(self.pending) - committed):
                self.pending[s] -= n  # stages it never reached will not count it
        finally:
            acc.done += 1

    def _release(self, s: int, items: list[_Held]) -> None:
        for item in items:
            self.pending[s] -= item.inputs.shape[0]

    async def _watch(
        self,
        client: PeerClient,
        held: list[dict[str, list[_Held]]],
        stop: asyncio.Event,
        changed: asyncio.Event,
    ) -> None:
        """Track each stage's epoch; release what stages stepped on; resend what died unstepped."""
        missing_since: dict[tuple[int, str], float] = {}
        applied: dict[tuple[int, str], int] = {}  # (stage, replica): the last epoch it reported
        last_refresh = time.monotonic()
        while not stop.is_set():
            if time.monotonic() - last_refresh > 2.0:
                last_refresh = time.monotonic()
                try:
                    await self.refresh_stages()
                except SwarmError as e:
                    logger.warning("swarm incomplete: %s", e)
            found = await asyncio.gather(*(self._progress(key) for key in self.stages))
            now = time.monotonic()
            for s, live in enumerate(found):
                if live is None or s >= len(held) or s >= len(self.epochs):
                    continue  # no answer, or the chain changed shape under us
                if live:
                    self.epochs[s] = max(r.epoch for r in live.values())
                for peer, r in live.items():
                    applied[(s, peer)] = r.epoch
                for peer in list(held[s]):
                    # A replica's next round takes all it holds, so `step` is exact: once the
                    # replica itself reached it, the gradient is applied and its inputs can go.
                    # Not the stage's epoch: one that left holding it (moved, died) applied
                    # nothing, though the others stepped on without it.
                    keep, done = [], []
                    for it in held[s][peer]:
                        (keep if it.step > applied.get((s, peer), -1) else done).append(it)
                    self._release(s, done)
                    held[s][peer] = keep
                    if not keep:
                        del held[s][peer]
                    elif peer in live:
                        missing_since.pop((s, peer), None)
                    elif now - missing_since.setdefault((s, peer), now) >= MISSING_GRACE_S:
                        await self._resend(client, s, peer, held)
            changed.set()
            try:
                await within(stop.wait(), 0.2)
            except asyncio.TimeoutError:
                pass

    async def _wait_until(self, done, changed: asyncio.Event, what) -> float:
        """Wait (woken by the watcher) until `done()`; seconds waited.

        Bounded by step_timeout: past it we go on, staler, rather than stall the run; `what()`
        says what was still missing.
        """
        t0 = time.monotonic()
        deadline = t0 + self.config.step_timeout
        note_at = t0 + NOTE_EVERY_S
        while not done():
            now = time.monotonic()
            if now > deadline:
                logger.warning(
                    "%s after %.0f s: going on, staler", what(), self.config.step_timeout
                )
                break
            if now >= note_at:  # a long wait says so: nobody watches a silent terminal for long
                note_at += NOTE_EVERY_S
                logger.warning("waiting %.0f s: %s", now - t0, what())
            changed.clear()
            try:
                await within(changed.wait(), 1.0)
            except asyncio.TimeoutError:
                pass
        return time.monotonic() - t0

    async def _wait_epochs(self, wanted: list[int], changed: asyncio.Event) -> float:
        """Wait until each stage s has applied `wanted[s]` steps; seconds waited (bounded)."""
        return await self._wait_until(
            lambda: all(have >= want for have, want in zip(self.epochs, wanted, strict=False)),
            changed,
            lambda: f"stages at steps {self.epochs} stayed below {wanted}",
        )

    def _share(self, trainers: list[TrainerRecord] | None) -> int:
        """Samples this trainer sends per optimizer step: its part of the target batch."""
        cfg = self.config
        if not cfg.target_batch:
            return cfg.batch_size
        others = [t for t in trainers or [] if t.trainer_id != self.trainer_id]
        total = cfg.batch_size + sum(t.batch_size for t in others)
        return max(1, round(cfg.target_batch * cfg.batch_size / total))

    async def _run_async(self, client: PeerClient, record: TrainerRecord, on_step) -> None:
        """Steps without a barrier: step k's microbatches go out while the stages still average
        step k - 1, so gradients are at most one step stale; each is tagged with the stage
        step it is meant for, so every stage step gets exactly the batch meant for it."""
        cfg = self.config
        trainers = await asyncio.to_thread(fetch_trainers, self.dht, cfg.run_id, cfg.dht_timeout)
        share = self._share(trainers)
        mb_count = min(cfg.microbatches, share)
        window = asyncio.Semaphore(cfg.max_inflight or 2 * mb_count)
        self.epochs = [0] * len(self.stages)
        self.pending = [0] * len(self.stages)  # per stage: our samples sent but not applied
        held: list[dict[str, list[_Held]]] = [defaultdict(list) for _ in self.stages]
        stop, changed = asyncio.Event(), asyncio.Event()
        for s, live in enumerate(await asyncio.gather(*map(self._progress, self.stages))):
            self.epochs[s] = max((r.epoch for r in (live or {}).values()), default=0)
        base = list(self.epochs)  # our step k is each stage's step base + k
        watcher = asyncio.create_task(self._watch(client, held, stop, changed))
        batches = self.data.batches(share, cfg.seed)
        accs: dict[int, _StepAcc] = {}
        tasks: set[asyncio.Task] = set()
        applied = 0
        waited = 0.0
        t_last = time.monotonic()
        retries0 = self.retries

        def apply_ready() -> None:
            nonlocal applied, t_last, retries0
            while applied + 1 in accs and accs[applied + 1].done == accs[applied + 1].expected:
                acc = accs.pop(applied + 1)
                applied += 1
                if acc.samples:
                    self.optimizer.step(
                        [
                            acc.grads[id(p)] / acc.samples if id(p) in acc.grads else None
                            for p in self.optimizer.params
                        ]
                    )
                now = time.monotonic()
                self.samples_done += acc.samples
                loss = acc.loss_sum / acc.samples if acc.samples else float("nan")
                stats = StepStats(
                    applied,
                    loss,
                    acc.samples / max(now - t_last, 1e-9),
                    self.retries - retries0,
                    self.resent,
                    self.lost,
                )
                t_last, retries0 = now, self.retries
                self.history.append(stats)
                if on_step is not None:
                    on_step(stats)

        def finished(t: asyncio.Task) -> None:
            tasks.discard(t)
            window.release()

        try:
            for k in range(1, cfg.steps + 1):
                if self.stopping:
                    break
                # Our head too is at most one step stale: step k waits for step k - 2's update.
                while applied < k - 2 and tasks:
                    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                    apply_ready()
                # Step k's gradients are meant for each stage's step base + k; they go out once
                # every stage has applied step base + k - 2 (its round for k - 1 may still run).
                waited += await self._wait_epochs([b + k - 2 for b in base], changed)
                mbs = split_microbatches(next(batches), mb_count)
                acc = accs[k] = _StepAcc(len(mbs))
                tags = [b + k for b in base]
                for mb in mbs:
                    n = mb.shape[0]
                    await window.acquire()
                    for s in range(len(self.pending)):
                        self.pending[s] += n
                    task = asyncio.create_task(
                        self._microbatch_async(client, mb, acc, held, list(self.epochs), tags)
                    )
                    tasks.add(task)
                    task.add_done_callback(finished)
                apply_ready()
            while tasks:
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                apply_ready()
            apply_ready()
            # The last steps: with our record gone, stages step on what they hold; wait
            # (bounded) until they applied all we sent them.
            await self._stop_record()
            await asyncio.to_thread(
                _retract, self.dht, cfg.run_id, self.trainer_id, cfg.dht_timeout
            )
            waited += await self._wait_until(
                lambda: max(self.pending, default=0) <= 0,
                changed,
                lambda: f"stages still hold {self.pending} of our samples unapplied",
            )
        finally:
            stop.set()
            await watcher
        logger.info(
            "asynchronous run: waited %.1f s for the staleness bound; max staleness %d",
            waited,
            self.max_staleness,
        )

    # The loop

    async def run(self, on_step=None) -> list[StepStats]:
        """Train for `config.steps` optimizer steps; `on_step(StepStats)` is called after each."""
        cfg = self.config
        p2p = await self.dht.replicate_p2p()
        client = PeerClient(p2p, cfg.compression)
        await self.wait_for_swarm(timeout=cfg.join_timeout)
        record = TrainerRecord(
            self.trainer_id,
            cfg.batch_size,
            self.adam,
            cfg.target_batch,
            cfg.sync,
            cfg.average_every,
            cfg.outer_lr,
            cfg.outer_momentum,
        )
        await asyncio.to_thread(
            store_trainer, self.dht, cfg.run_id, record, RECORD_TTL_S, cfg.dht_timeout
        )
        stop = asyncio.Event()
        self._record_keeper = (asyncio.create_task(self._keep_record(record, stop)), stop)
        try:
            # Stages read trainer records every second or two: let them learn the target batch.
            await asyncio.sleep(2.5)
            if cfg.sync:
                await self._run_sync(client, record, on_step)
            else:
                await self._run_async(client, record, on_step)
        finally:
            await self._stop_record()
            # A tombstone so that stages stop counting our batch size.
            await asyncio.to_thread(
                _retract, self.dht, cfg.run_id, self.trainer_id, cfg.dht_timeout
            )
        return self.history

    async def _keep_record(self, record: TrainerRecord, stop: asyncio.Event) -> None:
        """Store our record every RECORD_REFRESH_S until `stop` is set. Stored only between
        steps, it lapsed while the run waited 30 s for a stage, and the stages, taking the run
        for ended, stepped on every bucket they held at once."""
        cfg = self.config
        while not stop.is_set():
            try:
                await within(stop.wait(), RECORD_REFRESH_S)
            except TimeoutError:
                ok = await asyncio.to_thread(
                    store_trainer, self.dht, cfg.run_id, record, RECORD_TTL_S, cfg.dht_timeout
                )
                if not ok:
                    logger.warning("refreshing our trainer record failed; retrying")

    async def _stop_record(self) -> None:
        """Stop refreshing our record (a store in flight completes first)."""
        if self._record_keeper is not None:
            task, stop = self._record_keeper
            self._record_keeper = None
            stop.set()
            await task

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
