"""DHT records of a training run: each replica's epoch and samples, each trainer's batch.

Written by stages and trainers; read by stages (when to step), trainers (when a step is done).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Any

from hivemind import DHT
from hivemind.utils.timed_storage import get_dht_time

from swarm.errors import BadRequest
from swarm.signing import is_peer_id
from swarm.training.optim8bit import AdamConfig

logger = logging.getLogger(__name__)

WIRE_VERSION = 1
# Averager prefixes end up inside dotted DHT keys, so a run id must not contain dots.
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# Bounds on what an unauthenticated trainer record may ask of the stages' optimizers.
MAX_BATCH = 1 << 20  # samples per step: more than any run of ours asks for
MAX_OUTER_LR = 2.0  # DiLoCo's outer Nesterov lr is 0.7; above 2 the outer step overshoots


def check_run_id(run_id: str) -> str:
    """Return run_id if it is usable in DHT keys and averager prefixes, else raise BadRequest."""
    if not isinstance(run_id, str) or not _RUN_ID_RE.match(run_id):
        raise BadRequest(f"--run-id must be 1-64 letters, digits, '-' or '_' (got {run_id!r})")
    return run_id


def stage_prefix(run_id: str, start: int, end: int) -> str:
    """The averaging group (hivemind prefix, no dots) of the replicas of blocks [start, end)."""
    return f"{check_run_id(run_id)}_stage{start}_{end}"


def progress_key(run_id: str, start: int, end: int) -> str:
    return f"{stage_prefix(run_id, start, end)}_progress"


def run_key(run_id: str) -> str:
    return f"{check_run_id(run_id)}_trainers"


@dataclass(frozen=True)
class ReplicaProgress:
    """One replica's place in its stage: its epoch (optimizer steps) and samples since.

    averaging: the epoch whose averaging round this replica is in (-1: none); while it is, its
    `samples` already count toward the step after that round.
    """

    peer_id: str
    epoch: int
    samples: int
    throughput: float = 0.0  # samples/s of backward work it measured (for rebalancing)
    queue: int = 0  # requests waiting in its compute queue when it wrote the record
    averaging: int = -1

    def to_wire(self) -> list:
        return [
            WIRE_VERSION,
            self.epoch,
            self.samples,
            float(self.throughput),
            self.queue,
            self.averaging,
        ]

    @classmethod
    def from_wire(cls, peer_id: str, value: Any) -> ReplicaProgress:
        ok = isinstance(value, (list, tuple)) and len(value) >= 5
        if ok:
            version, epoch, samples, throughput, queue = value[:5]
            averaging = value[5] if len(value) > 5 else -1
            ok = (
                all(_is_int(v) for v in (version, epoch, samples, queue, averaging))
                and isinstance(throughput, (int, float))
                and math.isfinite(throughput)
                and version >= 1
                and epoch >= 0
                and samples >= 0
                and averaging >= -1
            )
        if not ok:
            raise BadRequest(f"bad progress record from {peer_id}: {value!r}")
        return cls(peer_id, epoch, samples, float(throughput), queue, averaging)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class TrainerRecord:
    """What a trainer promises and asks of the stages: its batch, the optimizer, the run's rules.

    batch_size: samples it sends per optimizer step. target_batch: the run's global batch per
    step (0: the sum of the live trainers' batch sizes). sync: today's lock-step mode, where a
    stage steps only with every live replica and trainers wait for it. average_every: optimizer
    steps between averaging rounds (1: every step; H > 1: DiLoCo, local steps and an outer
    Nesterov step on the averaged parameter deltas).
    """

    trainer_id: str
    batch_size: int
    adam: AdamConfig
    target_batch: int = 0
    sync: bool = False
    average_every: int = 1
    outer_lr: float = 0.7
    outer_momentum: float = 0.9

    def to_wire(self) -> list:
        return [
            WIRE_VERSION,
            self.batch_size,
            self.adam.to_wire(),
            self.target_batch,
            self.sync,
            self.average_every,
            self.outer_lr,
            self.outer_momentum,
        ]

    @classmethod
    def from_wire(cls, trainer_id: str, value: Any) -> TrainerRecord:
        if not isinstance(value, (list, tuple)) or len(value) < 3:
            raise BadRequest(f"bad trainer record from {trainer_id}: {value!r}")
        batch = value[1]
        if not _is_int(batch) or not 0 < batch <= MAX_BATCH:
            raise BadRequest(
                f"bad batch size in trainer record from {trainer_id} (need 1..{MAX_BATCH}): "
                f"{batch!r}"
            )
        # Records of version 1 end after the optimizer: lock-step, every-step averaging.
        target, sync, every, outer_lr, outer_mom = (
            list(value[3:8]) + [0, True, 1, 0.7, 0.9][len(value[3:8]) :]
        )
        ok = (
            _is_int(target)
            and 0 <= target <= MAX_BATCH
            and isinstance(sync, bool)
            and _is_int(every)
            and 1 <= every <= 1 << 20
            and all(isinstance(x, (int, float)) and math.isfinite(x) for x in (outer_lr, outer_mom))
            and 0 < outer_lr <= MAX_OUTER_LR
            and 0 <= outer_mom < 1
        )
        if not ok:
            raise BadRequest(
                f"bad run settings in trainer record from {trainer_id} (need target batch "
                f"0..{MAX_BATCH}, average-every 1..{1 << 20}, 0 < outer lr <= {MAX_OUTER_LR}, "
                f"outer momentum in [0, 1)): {value!r}"
            )
        return cls(
            trainer_id,
            batch,
            AdamConfig.from_wire(value[2]),
            target,
            sync,
            every,
            float(outer_lr),
            float(outer_mom),
        )


@dataclass(frozen=True)
class RunPlan:
    """How the stages of a run step, as the live trainers ask (the first trainer id's rules)."""

    target_batch: int
    sync: bool
    average_every: int
    outer_lr: float
    outer_momentum: float
    adam: AdamConfig


def run_plan(trainers: list[TrainerRecord]) -> RunPlan | None:
    """The plan of the live trainers (sorted by id), or None when no trainer is live.

    In sync mode the target is the sum of their batch sizes (each waits for every step); else
    the largest target any of them asks for, or that sum where none asks.
    """
    if not trainers:
        return None
    lead = trainers[0]
    total = sum(t.batch_size for t in trainers)
    target = total if lead.sync else max(t.target_batch for t in trainers) or total
    return RunPlan(
        target, lead.sync, lead.average_every, lead.outer_lr, lead.outer_momentum, lead.adam
    )


def _get_dict(dht: DHT, key: str, timeout: float) -> dict[str, Any] | None:
    """peer id -> value of a dictionary key; {} when absent, None when the DHT did not answer.

    Only subkeys that are peer ids count: anyone may write under others, unsigned.
    """
    try:
        found = dht.get(key, latest=True, return_future=True).result(timeout=timeout)
    except Exception as e:  # a slow DHT must not stop training: callers poll again
        logger.debug("DHT get %s failed: %r", key, e)
        return None
    if found is None or not isinstance(found.value, dict):
        return {}
    out = {}
    for subkey, item in found.value.items():
        if is_peer_id(subkey):  # the DHT checked that this peer signed it (swarm.signing)
            out[subkey] = getattr(item, "value", None)
        else:
            logger.debug("ignoring a record of %s under %r: not a peer id", key, subkey)
    return out


def _store(dht: DHT, key: str, subkey: str, value: Any, ttl: float, timeout: float) -> bool:
    try:
        return bool(
            dht.store(key, value, get_dht_time() + ttl, subkey=subkey, return_future=True).result(
                timeout=timeout
            )
        )
    except Exception as e:
        logger.debug("DHT store %s failed: %r", key, e)
        return False


def store_progress(
    dht: DHT, run_id: str, span: tuple[int, int], rec: ReplicaProgress, ttl: float, timeout: float
) -> bool:
    return _store(dht, progress_key(run_id, *span), rec.peer_id, rec.to_wire(), ttl, timeout)


def retract_progress(
    dht: DHT, run_id: str, span: tuple[int, int], peer_id: str, ttl: float, timeout: float
) -> bool:
    """A tombstone: trainers stop waiting for a replica that left on purpose."""
    return _store(dht, progress_key(run_id, *span), peer_id, None, ttl, timeout)


def fetch_progress(
    dht: DHT, run_id: str, span: tuple[int, int], timeout: float
) -> dict[str, ReplicaProgress] | None:
    """peer id -> its live progress record (malformed ones skipped); None if the DHT is silent."""
    found = _get_dict(dht, progress_key(run_id, *span), timeout)
    if found is None:
        return None
    out = {}
    for peer_id, value in found.items():
        if value is None:
            continue
        try:
            out[peer_id] = ReplicaProgress.from_wire(peer_id, value)
        except BadRequest as e:
            logger.warning("%s", e)
    return out


def store_trainer(dht: DHT, run_id: str, rec: TrainerRecord, ttl: float, timeout: float) -> bool:
    return _store(dht, run_key(run_id), rec.trainer_id, rec.to_wire(), ttl, timeout)


def fetch_trainers(dht: DHT, run_id: str, timeout: float) -> list[TrainerRecord] | None:
    """The run's live trainers, sorted by id; None if the DHT did not answer."""
    found = _get_dict(dht, run_key(run_id), timeout)
    if found is None:
        return None
    out = []
    for trainer_id, value in found.items():
        if value is None:
            continue
        try:
            out.append(TrainerRecord.from_wire(trainer_id, value))
        except BadRequest as e:
            logger.warning("%s", e)
    return sorted(out, key=lambda r: r.trainer_id)
