"""A trainable stage: fp32 master weights of a span, gradients from stateless backward, group steps.

Plugged into the peer as its compute backend under `swarm-peer join --train --run-id NAME`.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import torch
from hivemind import DHT

from swarm.errors import BadRequest, PeerUnavailable
from swarm.model import BlockSpan
from swarm.peer.backend import SpanBackend
from swarm.training.averaging import StageAverager
from swarm.training.optim8bit import AdamConfig, AdamW
from swarm.training.progress import (
    ReplicaProgress,
    fetch_progress,
    fetch_trainers,
    retract_progress,
    stage_prefix,
    store_progress,
)

logger = logging.getLogger(__name__)


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
    max_failed_rounds: int = 2  # after this many failed rounds in one epoch, step locally
    load_state_timeout: float = 30.0
    load_state_attempts: int = 3
    dht_timeout: float = 5.0


class TrainableStage(SpanBackend):
    """Blocks [start, end) in training mode, one replica of a stage of a SWARM run.

    `forward` runs without autograd; `backward(inputs, grad_out)` recomputes the forward from the
    resent inputs, accumulates parameter gradients and returns the input gradient. When the
    replicas of the stage have together accumulated the target batch (the sum of the live
    trainers' batch sizes), they average gradients and parameters (weighted by samples) and all
    take one AdamW step. A failed round is retried; after `max_failed_rounds` a replica steps on
    its own gradients and the next round's parameter averaging brings it back in line.
    """

    def __init__(self, span: BlockSpan, dht: DHT, config: StageTrainingConfig) -> None:
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
        self.epoch = 0
        self.samples = 0  # samples accumulated in p.grad for the current epoch
        self.target_batch = config.default_batch
        self.steps_averaged = 0
        self.steps_local = 0
        self._failed_rounds = 0
        self._published_samples = 0
        self._busy_s = 0.0  # seconds of backward compute, for the throughput estimate
        self._done = 0
        self._lock = threading.RLock()  # guards params, grads, optimizer, counters
        # Held through a whole step (averaging included): state is shared only between steps.
        self._step_lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._grad_bufs = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]
        self._param_bufs = [p.detach().clone() for p in self.params]
        self.averager = StageAverager(
            self._grad_bufs + self._param_bufs,
            dht,
            prefix=stage_prefix(config.run_id, *self.key),
            state_getter=self._state_for_download,
            min_matchmaking_time=config.matchmaking_time,
            request_timeout=max(0.2, config.matchmaking_time / 2),
            next_chunk_timeout=config.averaging_timeout / 2,
        )
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
            }
            tensors = [p.detach().clone() for p in self.params] + self.optimizer.state_tensors()
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
            for p, t in zip(self.params, tensors[:n], strict=True):
                p.copy_(t)
            self.optimizer.load_state_tensors(tensors[n:], steps)
            self.epoch = epoch

    # Compute (called by the peer's compute worker)

    def forward(
        self, hidden: torch.Tensor, first: int | None = None, last: int | None = None
    ) -> torch.Tensor:
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
        if hidden.shape != grad_out.shape:
            raise BadRequest(f"grad_out {tuple(grad_out.shape)} != inputs {tuple(hidden.shape)}")
        with self._lock, torch.enable_grad():
            t0 = time.perf_counter()  # compute only: waiting for the lock is not capacity
            x = hidden.detach().float().requires_grad_(True)
            out = self.span(x, 0, None, first, last)
            torch.autograd.backward(out, grad_out.float())
            self.samples += x.shape[0]
            self._busy_s += time.perf_counter() - t0
            self._done += x.shape[0]
        self._wake.set()
        return x.grad.to(hidden.dtype)

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
        with self._lock:
            rec = ReplicaProgress(
                self.peer_id, self.epoch, self.samples, self.throughput, int(self.queue_length())
            )
        self._published_samples = rec.samples
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
        if trainers:
            self.target_batch = sum(t.batch_size for t in trainers)
            self.optimizer.config = trainers[0].adam

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
                self._maybe_step()
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

    def _maybe_step(self) -> None:
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
            # A replica has already stepped this epoch: follow it now, on our own gradients.
            self._step(average=False)
        elif self.target_batch > 0 and total >= self.target_batch:
            self._step(average=bool(same))

    def _catch_up(self) -> None:
        logger.warning(
            "stage %s:%s is behind at epoch %d; downloading state", *self.key, self.epoch
        )
        try:
            metadata, tensors = self.averager.download_state(self.train_config.load_state_timeout)
            self._load_state(metadata, tensors)
            self.averager.state_sharing_priority = float(self.epoch)
        except (PeerUnavailable, BadRequest) as e:
            logger.warning("catch-up download failed: %s", e)
        self._publish()

    def _step(self, average: bool) -> None:
        with self._step_lock:
            self._step_locked(average)

    def _step_locked(self, average: bool) -> None:
        with self._lock:
            n = self.samples
            grad_sums = [
                p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                for p in self.params
            ]
            for p in self.params:
                p.grad = None
            self.samples = 0
            with self.averager.get_tensors() as bufs:
                k = len(self.params)
                for buf, g in zip(bufs[:k], grad_sums, strict=True):
                    buf.copy_(g / max(n, 1))
                for buf, p in zip(bufs[k:], self.params, strict=True):
                    buf.copy_(p.detach())
        averaged = False
        if average:
            t0 = time.monotonic()
            try:
                size = self.averager.average(float(n), self.train_config.averaging_timeout)
                averaged = True
                logger.info(
                    "stage %s:%s epoch %d: averaged %d samples with %d replicas in %.2fs",
                    *self.key,
                    self.epoch,
                    n,
                    size,
                    time.monotonic() - t0,
                )
            except PeerUnavailable as e:
                self._failed_rounds += 1
                logger.warning("stage %s:%s epoch %d: %s", *self.key, self.epoch, e)
                if self._failed_rounds <= self.train_config.max_failed_rounds:
                    # A replica may have died holding samples: keep ours and wait until the
                    # trainers resend the lost ones to live replicas.
                    self._restore(grad_sums, n)
                    return
        with self._lock, torch.no_grad(), self.averager.get_tensors() as bufs:
            k = len(self.params)
            finite = all(torch.isfinite(b).all() for b in bufs)
            if averaged and finite:
                for p, buf, gbuf in zip(self.params, bufs[k:], bufs[:k], strict=True):
                    p.copy_(buf)
                    p.grad = gbuf.clone()
                self.steps_averaged += 1
            else:
                for p, g in zip(self.params, grad_sums, strict=True):
                    p.grad = g / max(n, 1)
                self.steps_local += 1
                logger.info(
                    "stage %s:%s epoch %d: stepped alone on %d samples", *self.key, self.epoch, n
                )
            if averaged or n > 0:
                self.optimizer.step()
            for p in self.params:
                p.grad = None
            self.epoch += 1
            self._failed_rounds = 0
        self.averager.state_sharing_priority = float(self.epoch)
        self._publish()

    def _restore(self, grad_sums: list[torch.Tensor], n: int) -> None:
        with self._lock:
            for p, g in zip(self.params, grad_sums, strict=True):
                p.grad = g if p.grad is None else p.grad + g
            self.samples += n
        self._publish()

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
