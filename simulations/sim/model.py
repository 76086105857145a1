"""The simulated run's configuration and the per-stage costs derived from the model's shape.

Used by the churn simulator: compute grows as hidden^2 x tokens, traffic as hidden x tokens.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from swarm.peer.config import PeerConfig

STRATEGIES = ("swarm", "swarm-norebalance", "pipeline")


@dataclass
class SimConfig:
    """Everything a churn simulation depends on; CLI flags and calibration JSON set these fields."""

    peers: int = 400
    stages: int = 8
    hidden: int = 2048  # 2048 x 24 layers: a 1.2B-parameter-shaped model
    layers: int = 24
    seq_len: int = 512
    vocab: int = 32000
    bandwidth_mbps: float = 200.0  # per peer, each direction
    latency_ms: float = 50.0
    preempt_per_hour: float = 0.0  # preemptions per hour across the whole swarm (Poisson)
    rejoin_delay_s: float = 600.0  # mean (exponential) time before a preempted peer is back
    startup_s: float = 60.0  # a (re)joining machine's boot before it downloads its stage
    # Fixed schedule instead of Poisson (the real-process harness): a preemption every
    # 3600 / preempt_per_hour s from then on, each peer back after exactly rejoin_delay_s.
    periodic_churn: bool = False
    # Preempt only online peers whose stage keeps another online replica (the harness's rule).
    spare_last_replica: bool = False
    # Optimizer steps. A stage steps when its replicas together hold target_batch samples (0: the
    # samples of every trainer's in-flight window, one step per window); rounded to whole
    # microbatches per trainer (per pipeline for the pipeline strategy).
    target_batch: int = 0
    # An averaging round: hivemind's min_matchmaking_time, then an all-reduce of this many bytes
    # per parameter over the replicas' links (fp32 gradients + fp32 parameters, as
    # swarm.training.stage averages them); a replica alone steps at once.
    matchmaking_s: float = 1.0
    averaging_bytes_per_param: float = 8.0
    # SWARM: rounds run while the peers keep computing (gradients that arrive meanwhile count
    # toward the next step) and trainers stay at most one step ahead of the slowest stage. False:
    # lock-step (swarm-train --sync): trainers wait for every stage's round. The pipeline
    # strategy always steps with a barrier.
    background_averaging: bool = True
    # The calibration's lock-step (the harness's swarm-train): the in-flight microbatches form one
    # step; the next starts step_overhead_s after the last of them finishes or is lost, plus
    # averaging_s while any stage has two or more online replicas. Measured costs: it replaces
    # target_batch and the modelled rounds above.
    step_barrier: bool = False
    step_overhead_s: float = 0.0
    averaging_s: float = 0.0
    hours: float = 24.0
    strategy: str = "swarm"
    seed: int = 0
    speed_tflops: float = 20.0  # median effective FLOP/s of a peer (T4-class)
    speed_sigma: float = 0.4  # log-normal spread of peer speeds
    # Overrides the speed: median peer's forward+backward seconds per sample on a middle stage.
    compute_per_sample_s: float | None = None
    backward_compute_factor: float = 3.0  # 2x for gradients + 1x recomputing the forward
    bytes_per_activation: float = 1.0  # int8 on the wire; 2.0 for fp16
    state_bytes_per_param: float = 16.0  # fp32 weights + 2 optimizer moments + fp16 copy
    microbatch: int = 0  # samples per simulated task; 0 picks the smallest within max_hops
    in_flight_per_peer: float = 2.0  # sets inflight when that is 0
    # Microbatches each trainer keeps in flight, pipelined through the stages (0: in_flight_per_peer
    # x peers / trainers). The pipeline strategy splits the trainers' total over its pipelines.
    inflight: int = 0
    peers_per_trainer: int = 50  # each trainer keeps its own wiring
    # Variants of the backward's traffic. SWARM (not in swarm.training today): a backward returns
    # to the replica that ran the forward, which kept its input, so only the gradient travels
    # (elsewhere, with the input, if that replica is gone).
    swarm_stash_inputs: bool = False
    # Pipeline: the backward resends each stage's input, as swarm-train --wiring fixed does,
    # instead of the peers stashing their activations (GPipe, the default here).
    pipeline_resends_inputs: bool = False
    detect_s: float = 30.0  # time for a trainer to notice that a peer died (SWARM's timeout)
    ban_s: float = 60.0  # how long a failed peer is banned (its DHT record's expiry)
    dht_refresh_s: float = 30.0  # how stale the trainers' view of the stages is
    retry_wait_s: float = 5.0  # wait before retrying a stage that has no eligible replica
    max_retries: int = 20  # per hop; beyond it the microbatch is lost
    rebalance_period_s: float = 300.0
    min_gain: float = PeerConfig.min_gain  # training peers' move threshold (swarm-peer --min-gain)
    bins: int = 96  # points of the throughput-over-time curve
    max_hops: int = 600_000  # budget auto_microbatch aims for

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.peers < self.stages or self.stages < 1:
            raise ValueError(f"need at least one peer per stage: {self.peers} < {self.stages}")
        for name in ("hidden", "layers", "seq_len", "hours", "bandwidth_mbps", "speed_tflops"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        if self.preempt_per_hour < 0 or self.latency_ms < 0:
            raise ValueError("preempt_per_hour and latency_ms must be >= 0")
        for name in ("target_batch", "inflight", "matchmaking_s", "averaging_bytes_per_param"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")

    def replace(self, **changes: object) -> SimConfig:
        return dataclasses.replace(self, **changes)


def load_calibration(path: str | Path) -> dict:
    """SimConfig fields measured on real peers (e.g. compute_per_sample_s), checked by name."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a calibration file holds one JSON object")
    known = {f.name for f in dataclasses.fields(SimConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown calibration fields {unknown}; known: {sorted(known)}")
    return data


@dataclass(frozen=True)
class StageCosts:
    """Per sample: FLOPs of each stage's forward and backward, bytes crossing each boundary."""

    fwd_flops: tuple[float, ...]
    bwd_flops: tuple[float, ...]
    act_bytes: float  # one activation (or its gradient) at a stage boundary
    token_bytes: float  # the inputs of stage 0
    state_bytes: tuple[float, ...]  # what a joining peer downloads for each stage
    params: tuple[float, ...]  # parameters of each stage (what a round averages)
    median_speed: float  # FLOP/s

    @property
    def flops_per_sample(self) -> float:
        return sum(self.fwd_flops) + sum(self.bwd_flops)


def stage_costs(cfg: SimConfig) -> StageCosts:
    """Square-cube law: a layer costs ~24 h^2 + 4 s h FLOPs per token, a boundary h bytes/token."""
    per_stage = cfg.layers / cfg.stages
    layer_flops = 24.0 * cfg.hidden**2 + 4.0 * cfg.seq_len * cfg.hidden
    fwd = [cfg.seq_len * per_stage * layer_flops for _ in range(cfg.stages)]
    fwd[-1] += cfg.seq_len * 2.0 * cfg.hidden * cfg.vocab  # the LM head lives on the last stage
    bwd = [f * cfg.backward_compute_factor for f in fwd]
    params = [per_stage * 12.0 * cfg.hidden**2 for _ in range(cfg.stages)]
    params[0] += cfg.vocab * cfg.hidden
    params[-1] += cfg.vocab * cfg.hidden
    speed = cfg.speed_tflops * 1e12
    if cfg.compute_per_sample_s is not None:
        middle = cfg.stages // 2
        speed = (fwd[middle] + bwd[middle]) / cfg.compute_per_sample_s
    return StageCosts(
        fwd_flops=tuple(fwd),
        bwd_flops=tuple(bwd),
        act_bytes=cfg.seq_len * cfg.hidden * cfg.bytes_per_activation,
        token_bytes=cfg.seq_len * 4.0,
        state_bytes=tuple(p * cfg.state_bytes_per_param for p in params),
        params=tuple(params),
        median_speed=speed,
    )


def bound_throughputs(cfg: SimConfig, costs: StageCosts) -> tuple[float, float]:
    """(compute bound, network bound) of the whole swarm in samples/s, for median peers."""
    per_stage = cfg.peers / cfg.stages
    compute = min(
        per_stage * costs.median_speed / (f + b)
        for f, b in zip(costs.fwd_flops, costs.bwd_flops, strict=True)
    )
    # A middle stage's downlink carries the input, and for backward the input and the gradient.
    network = per_stage * cfg.bandwidth_mbps * 1e6 / 8.0 / (3.0 * costs.act_bytes)
    return compute, network


def auto_microbatch(cfg: SimConfig, costs: StageCosts) -> int:
    """Samples per simulated task: the smallest count keeping the run within max_hops."""
    if cfg.microbatch > 0:
        return cfg.microbatch
    samples = min(bound_throughputs(cfg, costs)) * cfg.hours * 3600.0
    wanted = samples * 2 * cfg.stages / cfg.max_hops
    return max(1, math.ceil(wanted))
