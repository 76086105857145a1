"""A trainable stage: fp32 master weights of a span, gradients from stateless backward, group steps.

Plugged into the peer as its compute backend under `swarm-peer join --train --run-id NAME`.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from hivemind import DHT

from swarm.errors import BadRequest, PeerUnavailable
from swarm.model import BlockSpan
from swarm.peer.backend import SpanBackend
from swarm.training.averaging import StageAverager
from swarm.training.guard import GradientGuard, GradientGuardConfig, gradient_norm
from swarm.training.optim8bit import AdamConfig, AdamW
from swarm.training.progress import (
    ReplicaProgress,
    RunPlan,
    fetch_progress,
    fetch_trainers,
    retract_progress,
    run_plan,
    stage_prefix,
    store_progress,
)

logger = logging.getLogger(__name__)

# A replica behind us is waited for this long per epoch before we step alone: a record read
# lags a publish by a poll or two (0.25 s each), and a state download takes about a second.
LAG_GRACE_S = 3.0
# Asynchronous mode: a coming step whose count stays short of the target batch this long is
# stepped on as it is. Counts can end up off by a microbatch (a trainer paused, a gradient
# resent after its holder stepped), and the trainers wait for our step before they send more:
# without this the run stalled for good. A step cut short moves late gradients to the next one.
SHORT_GRACE_S = 5.0


@dataclass
class StageTrainingConfig:
    """How a stage trains and keeps in step with its replicas."""

    run_id: str
    optim_8bit: bool = False  # moments in block-wise dynamic 8 bits
    default_batch: int = 0  # target batch until a trainer publishes one (0: do not step)
    poll_period: float = 0.25  # seconds between progress checks
    progress_ttl: float = 6.0  # a replica not heard of for this long is gone
    matchmaking_time: float = 1.0  # how long a round waits for the stage's replicas to gather
    averaging_timeout: float = 10.0  # bound on one averaging round
    # Lock-step: how long one epoch's failed or short rounds are retried before the replica
    # steps on what it has. Long enough for a dead partner's progress record to expire
    # (progress_ttl) and the trainers to resend its share (2 s later) on a loaded machine.
    max_retry_s: float = 30.0
    load_state_timeout: float = 30.0
    load_state_attempts: int = 3
    dht_timeout: float = 5.0
    max_lr: float = 1.0  # a trainer record asking for more is stepped at this learning rate
    trainers: tuple[str, ...] = ()  # peer ids whose records set the plan; () = any signed one
    guard: GradientGuardConfig = field(default_factory=GradientGuardConfig)


def stage_averager(
    model_config, start: int, end: int, dht: DHT, config: StageTrainingConfig
) -> StageAverager:
    """The averager of blocks [start, end): buffers for their gradients and weights.

    Make it before the span's weights load: hivemind forks the averager's process, and a fork
    after loading would keep a copy-on-write image of every weight and moment the parent then
    changes (about 12 bytes per parameter more per peer).
    """
    with torch.device("meta"):
        shapes = [p.shape for p in BlockSpan(model_config, start, end).parameters()]
    buffers = [torch.zeros(s, dtype=torch.float32) for s in shapes * 2]
    return StageAverager(
        buffers,
        dht,
        prefix=stage_prefix(config.run_id, start, end),
        min_matchmaking_time=config.matchmaking_time,
        request_timeout=max(0.2, config.matchmaking_time / 2),
        next_chunk_timeout=config.averaging_timeout / 2,
    )


class TrainableStage(SpanBackend):
    """Blocks [start, end) in training mode, one replica of a stage of a SWARM run.

    `forward` runs without autograd; `backward(inputs, grad_out)` recomputes the forward from the
    resent inputs, accumulates parameter gradients and returns the input gradient. When the
    replicas of the stage together hold the run's target batch they average gradients and
    parameters (weighted by samples) and all take one AdamW step. How, the trainers' records say:
    - asynchronous (default): the round runs in the step thread while backward calls go on; what
      arrives meanwhile counts toward the next step (at most one step stale). A failed round
      steps alone; the next round's parameter averaging brings the replicas back in line.
    - lock-step (`swarm-train --sync`): a failed round is retried (the trainers resend what a dead
      replica held); after `max_retry_s` the replica steps on what it holds.
    - DiLoCo (`--average-every H`): local AdamW steps; every H steps an outer Nesterov step on
      the replicas' averaged parameter deltas.
    Memory per parameter: weights 4 B, accumulated gradients 4 B, AdamW moments 8 B (2 B with
    --optim-8bit), averaging buffers 8 B (gradients and weights), during a step 4 B more (the
    gradients being stepped on while new ones accumulate); DiLoCo adds 8 B (anchor, momentum).
    """

    serves_adapters = False  # its weights move every step: nothing to fine-tune against

    def __init__(
        self,
        span: BlockSpan,
        dht: DHT,
        config: StageTrainingConfig,
        averager: StageAverager | None = None,
    ) -> None:
        super().__init__(span.float(), torch.float32)
        self.span.train()
        self.queue_length = lambda: 0  # the peer points this at its handler's in-flight count
        self.train_config = config
        self.dht = dht
        self.key = (span.start, span.end)
        self.peer_id = dht.peer_id.to_base58()
        self.params = [p for p in self.span.parameters()]
        for p in self.params:
            p.requires_grad_(True)
        self.optimizer = AdamW(self.params, AdamConfig(), eight_bit=config.optim_8bit)
        self.guard = GradientGuard(config.guard)
        self.epoch = 0
        self.samples = 0  # samples accumulated in p.grad for the current epoch
        self.target_batch = config.default_batch
        self.steps_averaged = 0
        self.steps_local = 0
        self.rounds_discarded = 0  # averaged rounds refused as non-finite or out of bounds
        self._retrying: tuple[int, float] | None = None  # lock-step: (epoch, first failed round)
        self._lag_seen: tuple[int, float] | None = None  # (epoch, when) a replica behind was seen
        self._short_seen: tuple[tuple[int, int], float] | None = None  # ((epoch, count), since)
        self._published_samples = 0
        self._busy_s = 0.0  # seconds of backward compute, for the throughput estimate
        self._done = 0
        self._lock = threading.RLock()  # guards params, grads, optimizer, counters
        # Held through a whole step (averaging included): state is shared only between steps.
        self._step_lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        if averager is None:
            averager = stage_averager(span.config, *self.key, dht, config)
        shapes = [p.shape for p in self.params]
        if [t.shape for t in averager.buffers] != shapes * 2:
            raise ValueError("the averager's buffers do not match this span's parameters")
        self.averager = averager
        self.averager.set_state_getter(self._state_for_download)
        # Asynchronous mode: gradients meant for a later step wait in its bucket,
        # step -> [summed gradients, samples]; the coming step's are in p.grad.
        self._later: dict[int, list] = {}
        self.plan: RunPlan | None = None  # the run's rules, from the live trainers' records
        self._last_plan: RunPlan | None = None
        self._strangers: list[str] = []  # trainers outside --run-trainers, last warned of
        self._averaging = -1  # epoch of the round in flight (asynchronous mode), -1: none
        # Lock-step: the samples of the round in flight. Our record keeps counting them for this
        # epoch: a replica that read 0 from us mid-round saw the batch short and never joined.
        self._round_samples = 0
        # DiLoCo: parameters at the last outer step, outer momentum, samples since then.
        self._anchor: list[torch.Tensor] | None = None
        self._outer_m: list[torch.Tensor] | None = None
        self._since_anchor = 0
        # Records are built and stored under one lock: a stale one must never be stored last.
        self._publish_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._beat: threading.Thread | None = None

    # Joining

    def join(self) -> bool:
        """Download the stage's current state from a live replica; False if we start fresh.

        Call before serving. With no replica alive the span keeps its checkpoint weights.
        """
        others: dict[str, ReplicaProgress] = {}
        for attempt in range(3):
            try:
                others = self._others()
                break
            except PeerUnavailable as e:
                logger.warning("reading the stage's replicas failed (attempt %d): %s", attempt, e)
        if not others:
            logger.info("stage %s:%s: no replica alive, starting from the checkpoint", *self.key)
            self._ready()
            return False
        for attempt in range(1, self.train_config.load_state_attempts + 1):
            try:
                metadata, tensors = self.averager.download_state(
                    self.train_config.load_state_timeout
                )
                self._load_state(metadata, tensors)
                logger.info("stage %s:%s: downloaded state at epoch %d", *self.key, self.epoch)
                self._ready()
                return True
            except (PeerUnavailable, BadRequest) as e:
                logger.warning("state download attempt %d failed: %s", attempt, e)
                time.sleep(min(2.0 * attempt, 5.0))
        # Start from the checkpoint at the others' epoch: the next round's averaging of
        # parameters pulls us to the group.
        self.epoch = max(r.epoch for r in others.values())
        logger.warning("stage %s:%s: no state downloaded, starting from checkpoint", *self.key)
        self._ready()
        return False

    def _ready(self) -> None:
        self.averager.state_sharing_priority = float(self.epoch)
        self.averager.allow_state_sharing = True
        self._publish()
        self._thread = threading.Thread(target=self._run, name="stage-steps", daemon=True)
        self._thread.start()
        self._beat = threading.Thread(target=self._heartbeat, name="stage-progress", daemon=True)
        self._beat.start()

    def _state_for_download(self):
        # Between steps only: mid-round, parameters and optimizer state are of different epochs.
        with self._step_lock, self._lock:
            metadata = {
                "epoch": self.epoch,
                "step_count": self.optimizer.step_count,
                "optim_8bit": self.optimizer.eight_bit,
                "span": list(self.key),
                "outer": self._anchor is not None,
            }
            tensors = [p.detach().clone() for p in self.params] + self.optimizer.state_tensors()
            if self._anchor is not None:
                tensors += [t.clone() for t in self._anchor + self._outer_m]
        return metadata, tensors

    def _load_state(self, metadata: dict, tensors: list[torch.Tensor]) -> None:
        n = len(self.params)
        if list(metadata.get("span", [])) != list(self.key) or len(tensors) < n:
            raise BadRequest(f"downloaded state is for span {metadata.get('span')}, not {self.key}")
        epoch, steps = metadata.get("epoch"), metadata.get("step_count")
        if not isinstance(epoch, int) or not isinstance(steps, int) or epoch < 0:
            raise BadRequest(f"downloaded state has bad metadata {metadata!r}")
        with self._lock, torch.no_grad():
            for p, t in zip(self.params, tensors[:n], strict=True):
                if p.shape != t.shape:
                    raise BadRequest(f"downloaded parameter shape {tuple(t.shape)} != {p.shape}")
            # Gradients that arrived meanwhile are kept: they count toward the coming step,
            # and dropping them would leave the stage short of its target batch.
            rest = tensors[n:]
            outer = None
            if metadata.get("outer") is True:
                if len(rest) < 2 * n:
                    raise BadRequest("downloaded state lacks its outer-step tensors")
                outer, rest = rest[len(rest) - 2 * n :], rest[: len(rest) - 2 * n]
                for p, t in zip(self.params * 2, outer, strict=True):
                    if p.shape != t.shape or t.dtype != torch.float32:
                        raise BadRequest("downloaded outer-step state has the wrong shape")
            for p, t in zip(self.params, tensors[:n], strict=True):
                p.copy_(t)
            self.optimizer.load_state_tensors(rest, steps)
            if outer is not None:
                self._anchor = [t.clone() for t in outer[:n]]
                self._outer_m = [t.clone() for t in outer[n:]]
            self.epoch = epoch
            # Buckets the download overtook count toward the coming step; later ones wait for
            # theirs. Folding those in too ran this replica one batch ahead of the trainers'
            # step tags for good: each step then held 12 samples or 4 of 8, and waited for the
            # trainers' staleness bound (tests/training, a peer moving mid-run).
            self._merge_later(upto=epoch + 1)

    # Compute (called by the peer's compute worker)

    def forward(
        self,
        hidden: torch.Tensor,
        first: int | None = None,
        last: int | None = None,
        adapter: Any = None,
        seed: int = 0,
    ) -> torch.Tensor:
        if adapter is not None:
            raise BadRequest("a training peer serves no adapters: its weights change every step")
        with self._lock, torch.no_grad():
            return self.span(hidden.float(), 0, None, first, last).to(hidden.dtype)

    def backward(
        self,
        hidden: torch.Tensor,
        grad_out: torch.Tensor,
        first: int | None = None,
        last: int | None = None,
    ) -> torch.Tensor:
        """Recompute the forward on `hidden`, accumulate parameter grads, return d loss/d hidden."""
        return self.backward_counted(hidden, grad_out, first, last)[0]

    def backward_counted(
        self,
        hidden: torch.Tensor,
        grad_out: torch.Tensor,
        first: int | None = None,
        last: int | None = None,
        deadline: float | None = None,
        step: int = 0,
    ) -> tuple[torch.Tensor, int]:
        """`backward`, and the optimizer step (epoch + 1, or + 2 during a round) it counts toward.

        Past `deadline` (time.monotonic()) the gradient is not counted and BadRequest is raised:
        the caller has given up on this call and resends it elsewhere. `step` (asynchronous
        mode) asks for a later step than the coming one: the gradient waits in that step's
        bucket (at most two ahead), so every step gets the batch its trainers meant for it.
        """
        if hidden.shape != grad_out.shape:
            raise BadRequest(f"grad_out {tuple(grad_out.shape)} != inputs {tuple(hidden.shape)}")
        if not bool(torch.isfinite(grad_out).all()):
            self.guard.check("grad_out", [grad_out], 1)  # raises: it names the problem
        t0 = time.perf_counter()  # compute only: waiting for the lock is not capacity
        with self._lock:
            # Under the lock: an optimizer step must not change weights mid-recompute.
            with torch.enable_grad():
                x = hidden.detach().float().requires_grad_(True)
                out = self.span(x, 0, None, first, last)
                grads = torch.autograd.grad(out, [x, *self.params], grad_out.float())
            if deadline is not None and time.monotonic() > deadline:
                raise BadRequest("backward finished after the caller's deadline: not counted")
            n = x.shape[0]
            # Before anything is accumulated: a refused gradient leaves no trace but the log.
            self.guard.check("the input gradient", grads[:1], n)
            self.guard.accept(self.guard.check("the parameter gradients", grads[1:], n))
            current = self.epoch + (2 if self._averaging >= 0 else 1)
            rules = self.plan or self._last_plan
            if rules is not None and not rules.sync and step > current:
                step = min(step, current + 2)
                bucket = self._later.get(step)
                if bucket is None:
                    self._later[step] = [[g.clone() for g in grads[1:]], n]
                else:
                    for acc, g in zip(bucket[0], grads[1:], strict=True):
                        acc.add_(g)
                    bucket[1] += n
            else:
                step = current
                for p, g in zip(self.params, grads[1:], strict=True):
                    if p.grad is None:
                        p.grad = g
                    else:
                        p.grad.add_(g)
                self.samples += n
            self._busy_s += time.perf_counter() - t0
            self._done += n
        self._wake.set()
        return grads[0].to(hidden.dtype), step

    def load_state(self, state_dict: dict[str, torch.Tensor]) -> None:
        with self._lock:
            super().load_state(state_dict)

    @property
    def throughput(self) -> float:
        """Samples/s of backward work measured so far (0 before the first)."""
        return self._done / self._busy_s if self._busy_s > 0 else 0.0

    # Stepping with the replicas

    def _others(self) -> dict[str, ReplicaProgress]:
        found = fetch_progress(
            self.dht, self.train_config.run_id, self.key, self.train_config.dht_timeout
        )
        if found is None:
            raise PeerUnavailable("the DHT did not answer a progress read")
        found.pop(self.peer_id, None)
        return found

    def _publish(self) -> None:
        with self._publish_lock:
            with self._lock:
                mine = self.samples
                rec = ReplicaProgress(
                    self.peer_id,
                    self.epoch,
                    mine + self._round_samples,
                    self.throughput,
                    int(self.queue_length()),
                    self._averaging,
                )
            self._published_samples = mine
            store_progress(
                self.dht,
                self.train_config.run_id,
                self.key,
                rec,
                self.train_config.progress_ttl,
                self.train_config.dht_timeout,
            )

    def _refresh_run(self) -> None:
        trainers = fetch_trainers(self.dht, self.train_config.run_id, self.train_config.dht_timeout)
        if trainers is None:
            return  # the DHT did not answer: keep the plan we have
        allowed = self.train_config.trainers
        if allowed:
            strangers = sorted({t.trainer_id for t in trainers} - set(allowed))
            if strangers and strangers != self._strangers:
                logger.warning("ignoring records of trainers not in --run-trainers: %s", strangers)
            self._strangers = strangers
            trainers = [t for t in trainers if t.trainer_id in allowed]
        plan = run_plan(trainers)
        self.plan = plan
        if plan is not None:
            self._last_plan = plan
        if plan is not None:
            self.target_batch = plan.target_batch
            adam = plan.adam
            if adam.lr > self.train_config.max_lr:
                if self.optimizer.config.lr != self.train_config.max_lr:
                    logger.warning(
                        "stage %s:%s: the run asks for lr %g, above this peer's --max-lr %g",
                        *self.key,
                        adam.lr,
                        self.train_config.max_lr,
                    )
                adam = replace(adam, lr=self.train_config.max_lr)
            self.optimizer.config = adam

    def _run(self) -> None:
        last_run = 0.0
        while not self._stop.is_set():
            self._wake.wait(self.train_config.poll_period)
            self._wake.clear()
            try:
                now = time.monotonic()
                if now - last_run > 1.0:
                    self._refresh_run()
                    last_run = now
                # With no trainer live, the last one's rules still say how to finish.
                rules = self.plan or self._last_plan
                if rules is None or rules.sync:
                    self._maybe_step_sync()
                else:
                    self._maybe_step_async(rules)
            except Exception:  # the step loop must outlive one bad round
                logger.exception("stage %s:%s: step loop error", *self.key)
                time.sleep(self.train_config.poll_period)

    def _heartbeat(self) -> None:
        # Apart from the step loop: a replica busy averaging must not look dead to trainers.
        while not self._stop.wait(self.train_config.progress_ttl / 4):
            try:
                self._publish()
            except Exception:
                logger.exception("stage %s:%s: publishing progress failed", *self.key)

    # Lock-step mode (--sync): a stage steps once per trainer step, with every live replica

    def _maybe_step_sync(self) -> None:
        others = self._others()
        ahead = [r for r in others.values() if r.epoch > self.epoch]
        same = [r for r in others.values() if r.epoch == self.epoch]
        if any(r.epoch > self.epoch + 1 for r in ahead):
            self._catch_up()
            return
        with self._lock:
            mine = self.samples
        if mine and mine != self._published_samples:
            self._publish()  # let the other replicas count our samples now
        total = mine + sum(r.samples for r in same)
        if ahead and not mine:
            # We missed a round (joined or stalled during it) and hold nothing of this epoch:
            # take the stage's state as it is now rather than step on nothing.
            self._catch_up()
        elif ahead:
            # A replica stepped this epoch and we did not: most often our round failed on our
            # side only (a groupmate's part did not come back) while theirs, with our gradients
            # in it, succeeded. Take its weights and moments: stepping alone on ours parted the
            # replicas (and the loss curve from single-process training).
            if self._catch_up():
                self._drop_gradients()
            else:
                self._step(group=0, retry_failed=True)
        elif self.target_batch > 0 and total >= self.target_batch:
            self._step(group=1 + len(same), retry_failed=True)

    # Asynchronous mode (default): averaging in the background, at most one step stale

    def _maybe_step_async(self, plan: RunPlan) -> None:
        """Start this epoch's step when the replicas together hold the target batch.

        Gradients that arrive while the round runs count toward the next step. A replica the
        others left behind downloads their state, keeping its gradients for the coming step:
        stepping on them alone would leave its optimizer moments apart from theirs for good.
        """
        others = self._others()
        with self._lock:
            mine = self.samples
        if mine and mine != self._published_samples:
            self._publish()
        ahead = [r for r in others.values() if r.epoch > self.epoch]
        if ahead:
            one_behind = all(r.epoch == self.epoch + 1 for r in ahead)
            if plan.average_every > 1 and one_behind and mine:
                self._local_step(plan, rounds_with=True)  # the others' outer round waits for us
            elif not self._catch_up() and mine:
                self._step(group=0, retry_failed=False)  # no donor answered: go on alone
            return
        same = [r for r in others.values() if r.epoch == self.epoch]
        if not same and self._waiting_for_laggard(others):
            return
        started = any(r.averaging == self.epoch for r in same)
        total = mine + sum(r.samples for r in same if r.averaging != self.epoch)
        if not started and not (self.target_batch > 0 and total >= self.target_batch):
            if self.plan_ended():
                with self._lock:
                    self._merge_later()  # no trainer left to fill them: step on all we hold
                    if not self.samples:
                        return
            elif not self._stuck_short(total):
                return
        if plan.average_every > 1:
            self._local_step(plan, rounds_with=bool(others))
        else:
            self._step(group=1 + len(same), retry_failed=False)

    def _drop_gradients(self) -> None:
        """Forget this epoch's gradients (they went into a round another replica stepped on)."""
        with self._lock:
            for p in self.params:
                p.grad = None
            self.samples = 0

    def _waiting_for_laggard(self, others: dict) -> bool:
        """Whether to hold our step for a replica behind us, for at most LAG_GRACE_S per epoch.

        Such a replica is most often our partner of the last round seen through a stale record,
        or one downloading our state. Stepping alone at once, on the later buckets the trainers
        already sent, ran one stage several epochs ahead of the others in a burst (0.5 s), and
        the trainers' staleness bound then stalled every step of the run.
        """
        if not any(r.epoch < self.epoch for r in others.values()):
            return False
        now = time.monotonic()
        if self._lag_seen is None or self._lag_seen[0] != self.epoch:
            self._lag_seen = (self.epoch, now)
        return now - self._lag_seen[1] < LAG_GRACE_S

    def _stuck_short(self, total: int) -> bool:
        """Whether the stage's count for the coming step, short of the target, has stayed at
        `total` (> 0) for SHORT_GRACE_S: it is all the trainers send for this step."""
        now = time.monotonic()
        key = (self.epoch, total)
        if self._short_seen is None or self._short_seen[0] != key:
            self._short_seen = (key, now)
            return False
        if total <= 0 or now - self._short_seen[1] < SHORT_GRACE_S:
            return False
        logger.warning(
            "stage %s:%s epoch %d: %d of the batch's %d samples, none more in %.0f s: stepping",
            *self.key,
            self.epoch,
            total,
            self.target_batch,
            SHORT_GRACE_S,
        )
        return True

    def _take_next_bucket(self) -> None:
        """Under the lock, once the current gradients are taken: the next step's bucket is now
        current (it counts toward epoch + 2 during a round, epoch + 2 after a local step)."""
        current = self.epoch + 2
        grads, n = self._later.pop(current, [[None] * len(self.params), 0])
        for p, g in zip(self.params, grads, strict=True):
            p.grad = g
        self.samples = n

    def _merge_later(self, upto: int | None = None) -> None:
        """Under the lock: fold the later steps' buckets (those up to step `upto`; None: all)
        into the coming step's gradients."""
        for step in sorted(self._later):
            if upto is not None and step > upto:
                break
            grads, count = self._later.pop(step)
            for p, g in zip(self.params, grads, strict=True):
                p.grad = g if p.grad is None else p.grad.add_(g)
            self.samples += count

    def plan_ended(self) -> bool:
        """No trainer is live: what is left accumulated is stepped on rather than kept."""
        return self.plan is None

    def _others_at(self, epoch: int) -> bool:
        """Whether another live replica is at `epoch` (a round may still form with it)."""
        try:
            return any(r.epoch == epoch for r in self._others().values())
        except PeerUnavailable:
            return False

    def _catch_up(self) -> bool:
        """Download the freshest replica's state (our gradients stay); False if that failed."""
        logger.warning(
            "stage %s:%s is behind at epoch %d; downloading state", *self.key, self.epoch
        )
        ok = False
        try:
            metadata, tensors = self.averager.download_state(self.train_config.load_state_timeout)
            self._load_state(metadata, tensors)
            self.averager.state_sharing_priority = float(self.epoch)
            ok = True
        except (PeerUnavailable, BadRequest) as e:
            logger.warning("catch-up download failed: %s", e)
        self._publish()
        return ok

    def _left_out(self) -> bool:
        """After our round failed: whether another replica averaged this epoch without us."""
        try:
            others = self._others().values()
        except PeerUnavailable:
            return False
        return any(r.epoch > self.epoch or r.averaging == self.epoch for r in others)

    def _step(self, group: int, retry_failed: bool) -> None:
        """One optimizer step; `group`: the live replicas at this epoch, this one included (the
        round starts once they all joined; 1 or less: step alone)."""
        with self._step_lock:
            self._step_locked(group, retry_failed)

    def _step_locked(self, group: int, retry_failed: bool) -> None:
        with self._lock:
            n = self.samples
            own = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
            self._take_next_bucket()
            with self.averager.get_tensors() as bufs:
                k = len(self.params)
                for buf, g in zip(bufs[:k], own, strict=True):
                    torch.div(g, max(n, 1), out=buf)
                for buf, p in zip(bufs[k:], self.params, strict=True):
                    buf.copy_(p.detach())
            if not retry_failed:
                self._averaging = self.epoch  # new gradients now count toward the next step
            else:
                self._round_samples = n
        averaged = False
        if group > 1:
            if not retry_failed:
                self._publish()  # replicas that see it join this round at once
            averaged = self._average(n, own, retry_failed, group)
            if averaged is None:
                return  # lock-step: gradients restored, the round is tried again
            if not averaged and self._others_at(self.epoch):
                # A partner that entered late failed alone too: once more, together.
                averaged = bool(self._average(n, own, retry_failed, group))
            if not averaged and self._left_out():
                # They stepped together without us: keep our gradients for the coming step and
                # take their state (`_maybe_step_async` downloads it) rather than drift apart.
                self._restore(own, n)
                with self._lock:
                    self._averaging = -1
                return
        with self._lock, torch.no_grad(), self.averager.get_tensors() as bufs:
            k = len(self.params)
            if averaged:
                averaged = self._round_ok(bufs[:k], bufs[k:])
            if averaged:
                for p, buf in zip(self.params, bufs[k:], strict=True):
                    p.copy_(buf)
                grads = [b.clone() for b in bufs[:k]]
                self.steps_averaged += 1
            else:
                grads = [g / max(n, 1) for g in own]
                self.steps_local += 1
                logger.info(
                    "stage %s:%s epoch %d: stepped alone on %d samples", *self.key, self.epoch, n
                )
            if averaged or n > 0:
                self.optimizer.step(grads)
            self.epoch += 1
            self._averaging = -1
            self._round_samples = 0
        self.averager.state_sharing_priority = float(self.epoch)
        self._publish()

    def _round_ok(self, grads: list[torch.Tensor], params: list[torch.Tensor]) -> bool:
        """Whether a round's averaged gradients and parameters may be used (else: step alone).

        One replica's NaN or huge contribution poisons the average for all: every honest
        replica then discards the round rather than step on it.
        """
        why = None
        if not all(bool(torch.isfinite(b).all()) for b in [*grads, *params]):
            why = "holds NaN or infinite values"
        else:
            # Honest averages are convex mixes of accepted gradients: never above their norms.
            problem = self.guard.problem(gradient_norm(grads))
            if problem is not None:
                why = f"has a per-sample gradient norm that {problem}"
        if why is not None:
            self.rounds_discarded += 1
            logger.warning(
                "stage %s:%s epoch %d: the averaged round %s; discarded", *self.key, self.epoch, why
            )
        return why is None

    def _average(
        self, n: int, own: list[torch.Tensor], retry_failed: bool, group: int = 0
    ) -> bool | None:
        """One round over the buffers; False if it failed (None: lock-step retries later).

        group: replicas expected (0: unknown, the round waits out the matchmaking time).
        Lock-step rounds must hold the whole target batch: a partner that died holding samples
        may still be counted in its last record, and a round without it (with a joiner, say)
        would step on part of the batch. Such a round is retried once the trainers resent.
        """
        t0 = time.monotonic()
        try:
            counts = self.averager.average(
                max(float(n), 1e-3), self.train_config.averaging_timeout, group, samples=n
            )
        except PeerUnavailable as e:
            why, short = str(e), False
        else:
            told = [c for c in counts if c is not None]
            held = sum(told) if len(told) == len(counts) else self.target_batch  # None: unknown
            logger.info(
                "stage %s:%s epoch %d: averaged %d samples with %d replicas in %.2fs (%d in all)",
                *self.key,
                self.epoch,
                n,
                len(counts),
                time.monotonic() - t0,
                held,
            )
            if not retry_failed or held >= self.target_batch:
                return True
            why = f"the round held {held} of the batch's {self.target_batch} samples"
            short = True
        logger.warning("stage %s:%s epoch %d: %s", *self.key, self.epoch, why)
        if retry_failed:
            now = time.monotonic()
            # Per epoch: one reached by a download (catching up) starts its own count.
            if self._retrying is None or self._retrying[0] != self.epoch:
                self._retrying = (self.epoch, now)
            if now - self._retrying[1] < self.train_config.max_retry_s:
                # A replica may have died holding samples: keep ours and wait until the
                # trainers resend the lost ones to live replicas.
                self._restore(own, n)
                return None
            # No trainer filled the batch in time: a short round still keeps replicas together.
            logger.warning("stage %s:%s: stepping on what the stage holds", *self.key)
        return short

    def _restore(self, grad_sums: list[torch.Tensor], n: int) -> None:
        with self._lock:
            for p, g in zip(self.params, grad_sums, strict=True):
                p.grad = g if p.grad is None else p.grad + g
            self.samples += n
            self._round_samples = 0
        self._publish()

    # DiLoCo (--average-every H > 1): local steps, an outer step on averaged deltas every H

    def _local_step(self, plan: RunPlan, rounds_with: bool) -> None:
        with self._step_lock:
            with self._lock, torch.no_grad():
                if self._anchor is None:
                    self._anchor = [p.detach().clone() for p in self.params]
                    self._outer_m = [torch.zeros_like(p) for p in self.params]
                n = self.samples
                grads = [p.grad / max(n, 1) if p.grad is not None else None for p in self.params]
                self._take_next_bucket()
                if n > 0:
                    self.optimizer.step(grads)
                self._since_anchor += n
                self.epoch += 1
                self.steps_local += 1
                outer = self.epoch % plan.average_every == 0
                if outer:
                    with self.averager.get_tensors() as bufs:
                        k = len(self.params)
                        for buf, a, p in zip(bufs[:k], self._anchor, self.params, strict=True):
                            torch.sub(a, p, out=buf)  # the pseudo-gradient of DiLoCo
                        for buf, a in zip(bufs[k:], self._anchor, strict=True):
                            buf.copy_(a)
            self._publish()
            if outer:
                self._outer_step(plan, rounds_with)

    def _outer_step(self, plan: RunPlan, rounds_with: bool) -> None:
        averaged = False
        if rounds_with:
            averaged = bool(self._average(self._since_anchor, [], retry_failed=False))
            if not averaged and self._others_at(self.epoch):
                averaged = bool(self._average(self._since_anchor, [], retry_failed=False))
        with self._lock, torch.no_grad(), self.averager.get_tensors() as bufs:
            k = len(self.params)
            if not all(torch.isfinite(b).all() for b in bufs):
                logger.warning("stage %s:%s: non-finite outer round, skipped", *self.key)
                return
            for i, p in enumerate(self.params):
                delta, anchor, m = bufs[i], self._anchor[i], self._outer_m[i]
                if averaged:
                    anchor.copy_(bufs[k + i])
                # Nesterov momentum on the averaged delta, as DiLoCo's outer SGD.
                m.mul_(plan.outer_momentum).add_(delta)
                anchor.sub_(delta + plan.outer_momentum * m, alpha=plan.outer_lr)
                p.copy_(anchor)
            self._since_anchor = 0
            self.steps_averaged += int(averaged)
        logger.info(
            "stage %s:%s epoch %d: outer step (%s)",
            *self.key,
            self.epoch,
            "averaged" if averaged else "alone",
        )

    # Inspection and shutdown

    def parameters_vector(self) -> torch.Tensor:
        with self._lock:
            return torch.cat([p.detach().reshape(-1) for p in self.params])

    def save(self, path: str) -> None:
        """Write this stage's blocks (HF tensor names) to one safetensors file."""
        from safetensors.torch import save_file

        from swarm.training.checkpoint import span_tensors

        with self._lock:
            tensors = span_tensors(self.span)
        save_file(tensors, path)

    def finish(self, timeout: float) -> bool:
        """Before this replica leaves the stage: wait until it stepped, with the others, on all
        the gradients it holds (no new ones come: its peer serves another span); False if that
        did not happen within `timeout`. The trainers otherwise resend them elsewhere."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                holds = self.samples or self._round_samples or self._later or self._averaging >= 0
            if not holds:
                return True
            time.sleep(self.train_config.poll_period)
        return False

    def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        for thread in (self._thread, self._beat):
            if thread is not None:
                thread.join(timeout=5)
        retract_progress(
            self.dht,
            self.train_config.run_id,
            self.key,
            self.peer_id,
            self.train_config.progress_ttl,
            self.train_config.dht_timeout,
        )
        try:
            self.averager.shutdown()
        except Exception as e:  # shutting down must not raise on a half-dead averager
            logger.debug("averager shutdown: %r", e)
