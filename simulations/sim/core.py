"""What every simulated strategy shares: peers that compute, links, churn, microbatches in flight.

Used by simulations/sim/strategies.py; subclasses decide where each hop of a microbatch goes.
"""

from __future__ import annotations

import math
import random
import time as wallclock
from dataclasses import asdict, dataclass, field

from simulations.sim.engine import EventQueue
from simulations.sim.model import SimConfig, auto_microbatch, stage_costs
from simulations.sim.network import SOURCE, Network
from simulations.sim.steps import StepRules

# Event kinds: (time, seq, kind, a, b); a is a microbatch or a peer, b an attempt or an epoch.
ARRIVE, DONE, FAIL, RETRY, PREEMPT, REJOIN, READY, REFRESH, REBALANCE = range(9)
STEP = 9  # with step_barrier: the next step's microbatches start (steps.py has kinds 10-13)
OFFLINE, LOADING, ONLINE = 0, 1, 2


@dataclass
class SimResult:
    """One run's figures; `throughput` is samples per virtual second."""

    strategy: str
    throughput: float
    utilisation: float
    lost_samples: int
    wasted_fraction: float  # compute thrown away / compute done
    redone_samples: int  # samples whose work was restarted (retried hop or whole pipeline)
    retries: int
    preemptions: int
    moves: int
    samples: int
    compute_bound: float  # samples/s if every live peer computed usefully all the time
    network_bound: float  # samples/s the median links allow with all peers up
    microbatch: int
    events: int
    wall_s: float
    step_batch: int = 0  # samples per optimizer step (target_batch in whole microbatches)
    steps: int = 0  # optimizer steps every stage finished
    mean_round_s: float = 0.0  # a stage's round (background) or a barrier's rounds (blocking)
    held_fraction: float = 0.0  # of microbatch-slot time held by the staleness bound / barrier
    max_staleness: int = 0  # most steps a gradient counted later than the step it was sent for
    resent_samples: int = 0  # gradients lost with a replica and sent again (SWARM)
    timeline: list = field(default_factory=list)  # [(hour, samples/s)]

    def to_dict(self, timeline: bool = False) -> dict:
        data = asdict(self)
        if not timeline:
            data.pop("timeline")
        return data


class BaseSim(StepRules):
    """Peers with FIFO compute queues and links, a Poisson preemption process, and microbatches.

    A microbatch makes 2 * stages hops (forward through every stage, backward in reverse); each
    hop is a transfer into the chosen peer (ARRIVE) and its compute (DONE). Subclasses implement
    `dispatch` (where the next hop goes) and the on_* hooks for peers dying and joining; the
    step rules (StepRules) decide when a slot may start its next microbatch.
    """

    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        self.costs = stage_costs(cfg)
        self.B = auto_microbatch(cfg, self.costs)
        self.S = S = cfg.stages
        self.N = N = cfg.peers
        # Separate streams: the preemption times are the same whatever the strategy does.
        self.rng = random.Random(cfg.seed)
        self.churn_rng = random.Random(cfg.seed * 7919 + 1)
        self.speed_rng = random.Random(cfg.seed * 7919 + 2)
        self.q = EventQueue()
        self.net = Network(N, cfg.bandwidth_mbps, cfg.latency_ms)
        mu = math.log(self.costs.median_speed)
        self.speed = [self.speed_rng.lognormvariate(mu, cfg.speed_sigma) for _ in range(N)]
        self.state = [ONLINE] * N
        self.epoch = [0] * N
        self.cfree = [0.0] * N  # when each peer's compute queue empties
        self.inflight: list[set[int]] = [set() for _ in range(N)]

        # Per hop h: which stage, FLOPs for B samples, and the trainer's task size.
        self.stage_of = [h if h < S else 2 * S - 1 - h for h in range(2 * S)]
        self.hop_flops = [
            self.B * (self.costs.fwd_flops[s] if h < S else self.costs.bwd_flops[s])
            for h, s in enumerate(self.stage_of)
        ]
        self.bytes_in = [self.B * b for b in self.hop_bytes()]
        self.bytes_full = [self.B * b for b in self.stateless_bytes()]  # what a resend carries
        self.legacy = cfg.step_barrier
        # Trainers, and the microbatches each keeps in flight.
        self.trainers = max(1, N // max(1, cfg.peers_per_trainer))
        self.window = cfg.inflight or max(1, round(cfg.in_flight_per_peer * N / self.trainers))

        self.alive_speed = sum(self.speed)
        self.cap_flops = 0.0  # integral of live peers' FLOP/s over time
        self.cap_t = 0.0
        self.samples = 0
        self.lost_samples = 0
        self.redone_samples = 0
        self.retries = 0
        self.preemptions = 0
        self.moves = 0
        self.wasted_flops = 0.0
        self.horizon = cfg.hours * 3600.0
        self.bin_s = self.horizon / max(1, cfg.bins)
        self.bins = [0] * (max(1, cfg.bins) + 1)

    # Subclass interface

    def hop_bytes(self) -> list[float]:
        """Bytes per sample each hop receives (from the previous hop's peer)."""
        raise NotImplementedError

    def stateless_bytes(self) -> list[float]:
        """Per-sample hop bytes when the backward carries each stage's input with its gradient."""
        S, act, tok = self.S, self.costs.act_bytes, self.costs.token_bytes
        inputs = [tok] + [act] * (S - 1)
        grads = [act] * (S - 1) + [0.0]  # the last stage computes the loss itself
        return inputs + [inputs[s] + grads[s] for s in reversed(range(S))]

    def stashed_bytes(self) -> list[float]:
        """Per-sample hop bytes when each peer kept its input: the backward carries the gradient."""
        S, act, tok = self.S, self.costs.act_bytes, self.costs.token_bytes
        grads = [act] * (S - 1) + [0.0]
        return [tok] + [act] * (S - 1) + [grads[s] for s in reversed(range(S))]

    def dispatch(self, t: float, m: int) -> None:
        raise NotImplementedError

    def on_kill(self, t: float, p: int, tasks: list[int]) -> None:
        raise NotImplementedError

    def on_rejoin(self, t: float, p: int) -> None:
        raise NotImplementedError

    def on_ready(self, t: float, p: int) -> None:
        raise NotImplementedError

    def handlers(self) -> dict:
        return {
            ARRIVE: self.arrive,
            DONE: self.done,
            PREEMPT: self.preempt,
            REJOIN: self.rejoin,
            READY: self.ready,
            STEP: self.step,
            **self.step_handlers(),
        }

    # Microbatches

    def init_microbatches(
        self, count: int, issuer_of: list[int], quota: int, blocking: bool
    ) -> None:
        """`count` slots; slot m belongs to issuer issuer_of[m], which sends `quota` per step."""
        self.M = count
        self.pos = [0] * count
        self.attempt = [0] * count
        self.mb_peer = [-1] * count
        self.src = [SOURCE] * count
        self.tries = [0] * count
        self.work = [0.0] * count  # FLOPs done on this microbatch's completed hops
        self.c_start = [-1.0] * count  # compute start of the current hop, -1 before arrival
        self.c_end = [0.0] * count
        self.sent_at = [0.0] * count
        self.parked: list[int] = []  # with step_barrier: finished microbatches awaiting the step
        self.init_steps(issuer_of, quota, blocking)
        if self.legacy:  # one step is the whole window
            self.step_batch = count * self.B

    def send(self, t: float, m: int, p: int, nbytes: float | None = None) -> None:
        """Start hop pos[m] of microbatch m on peer p: transfer its input, then queue compute."""
        self.mb_peer[m] = p
        self.inflight[p].add(m)
        self.c_start[m] = -1.0
        self.sent_at[m] = t
        src = self.src[m]
        if src != SOURCE and self.state[src] == OFFLINE:
            src = SOURCE  # the trainer kept a copy of what a dead peer had sent
        if nbytes is None:
            nbytes = self.bytes_in[self.pos[m]]
        arrival = self.net.transfer(src, p, nbytes, t)
        self.q.push(arrival, ARRIVE, m, self.attempt[m])

    def arrive(self, t: float, m: int, att: int) -> None:
        if att != self.attempt[m]:
            return
        p = self.mb_peer[m]
        start = self.cfree[p] if self.cfree[p] > t else t
        end = start + self.hop_flops[self.pos[m]] / self.speed[p]
        self.cfree[p] = end
        self.c_start[m] = start
        self.c_end[m] = end
        self.q.push(end, DONE, m, att)

    def done(self, t: float, m: int, att: int) -> None:
        if att != self.attempt[m]:
            return
        p = self.mb_peer[m]
        self.inflight[p].discard(m)
        h = self.pos[m]
        self.work[m] += self.hop_flops[h]
        self.on_done(t, m, p, h)
        if h >= self.S and not self.legacy:
            self.count_gradient(t, m, p, self.stage_of[h])
        h += 1
        self.tries[m] = 0
        if h == 2 * self.S:
            self.samples += self.B
            self.credit(t, m)
            self.complete(t, m)
            return
        self.pos[m] = h
        self.src[m] = p
        self.dispatch(t, m)

    def credit(self, t: float, m: int) -> None:
        """Microbatch m's samples count toward throughput in the bin of `t`."""
        self.bins[int(t / self.bin_s)] += self.B

    def complete(self, t: float, m: int) -> None:
        """Microbatch m finished or was lost: its slot goes on by the step rules."""
        if not self.legacy:
            self.finish(t, m)
            return
        self.restart(m)
        if not self.park(t, m):
            self.dispatch(t, m)

    def park(self, t: float, m: int) -> bool:
        """With step_barrier, hold finished (or lost) microbatch m until the whole step is done."""
        if not self.cfg.step_barrier:
            return False
        self.active[m] = False
        self.parked.append(m)
        if len(self.parked) == self.M:
            wait = self.cfg.step_overhead_s + (self.cfg.averaging_s if self.averaging() else 0.0)
            self.round_time += wait
            self.q.push(t + wait, STEP)
        return True

    def averaging(self) -> bool:
        """Hook: whether some stage's replicas must average before the step (SwarmSim)."""
        return True

    def step(self, t: float, _a: int, _b: int) -> None:
        parked, self.parked = self.parked, []
        self.rounds += 1
        self.completed = [c + 1 for c in self.completed]
        for m in parked:
            self.active[m] = True
            self.dispatch(t, m)

    def on_done(self, t: float, m: int, p: int, h: int) -> None:
        """Hook: hop h of m finished on p (the SWARM trainer measures the peer here)."""

    def restart(self, m: int) -> None:
        """Microbatch slot m starts a fresh microbatch (or redoes its own) from stage 0."""
        self.pos[m] = 0
        self.src[m] = SOURCE
        self.work[m] = 0.0
        self.tries[m] = 0

    # Churn

    def account(self, t: float) -> None:
        self.cap_flops += self.alive_speed * (t - self.cap_t)
        self.cap_t = t

    def preempt(self, t: float, _a: int, _b: int) -> None:
        self.q.push(t + self.churn_gap(), PREEMPT)
        for _ in range(64):  # bounded: rejection sampling of a live victim
            p = self.churn_rng.randrange(self.N)
            if self.state[p] != OFFLINE and self.may_preempt(p):
                self.kill(t, p)
                return

    def may_preempt(self, p: int) -> bool:
        """Hook: whether live peer p may be the next victim (spare_last_replica narrows it)."""
        return True

    def churn_gap(self) -> float:
        """Seconds to the next preemption: exponential, or fixed with periodic_churn."""
        rate = self.cfg.preempt_per_hour / 3600.0
        return 1.0 / rate if self.cfg.periodic_churn else self.churn_rng.expovariate(rate)

    def kill(self, t: float, p: int) -> None:
        self.account(t)
        self.alive_speed -= self.speed[p]
        self.preemptions += 1
        tasks = sorted(self.inflight[p])
        for m in tasks:
            start = self.c_start[m]
            if 0.0 <= start < t:
                self.wasted_flops += (min(t, self.c_end[m]) - start) * self.speed[p]
        self.on_kill(t, p, tasks)
        self.state[p] = OFFLINE
        self.epoch[p] += 1
        self.inflight[p] = set()
        self.cfree[p] = t
        self.net.reset(p, t)
        delay = self.cfg.rejoin_delay_s
        if not self.cfg.periodic_churn:
            delay = self.churn_rng.expovariate(1.0 / delay)
        self.q.push(t + delay, REJOIN, p)

    def rejoin(self, t: float, p: int, _b: int) -> None:
        self.account(t)
        # A preempted VM comes back as a fresh machine, maybe of another speed.
        self.speed[p] = self.speed_rng.lognormvariate(
            math.log(self.costs.median_speed), self.cfg.speed_sigma
        )
        self.alive_speed += self.speed[p]
        self.state[p] = LOADING
        self.cfree[p] = t
        self.net.reset(p, t)
        self.on_rejoin(t, p)

    def ready(self, t: float, p: int, epoch: int) -> None:
        if epoch != self.epoch[p] or self.state[p] == OFFLINE:
            return  # died while loading
        self.state[p] = ONLINE
        self.cfree[p] = max(self.cfree[p], t)
        self.on_ready(t, p)

    def load_s(self, stage: int) -> float:
        """Downloading a stage's parameters and optimizer state from a replica."""
        return self.costs.state_bytes[stage] / self.net.bytes_per_s

    def network_bound(self) -> float:
        """Samples/s the links allow with every peer up, each stage's peers sharing its traffic."""
        down, up = [0.0] * self.S, [0.0] * self.S
        for h, nbytes in enumerate(self.hop_bytes()):
            down[self.stage_of[h]] += nbytes
            if h > 0 and self.stage_of[h - 1] != self.stage_of[h]:
                up[self.stage_of[h - 1]] += nbytes
        per_stage = self.N / self.S
        return min(
            per_stage * self.net.bytes_per_s / max(d, u, 1e-12)
            for d, u in zip(down, up, strict=True)
        )

    # Run

    def run(self) -> SimResult:
        started = wallclock.perf_counter()
        for m in range(self.M):
            if self.legacy:
                self.active[m] = True
                self.dispatch(0.0, m)
            else:
                self.issue(0.0, m)
        if self.cfg.preempt_per_hour > 0:
            self.q.push(self.churn_gap(), PREEMPT)
        events = self.q.run(self.handlers(), until=self.horizon)
        self.account(self.horizon)
        useful = self.samples * self.costs.flops_per_sample
        slot_s = self.M * self.horizon
        return SimResult(
            strategy=self.cfg.strategy,
            throughput=self.samples / self.horizon,
            utilisation=useful / self.cap_flops if self.cap_flops else 0.0,
            lost_samples=self.lost_samples,
            wasted_fraction=self.wasted_flops / (useful + self.wasted_flops) if useful else 0.0,
            redone_samples=self.redone_samples,
            retries=self.retries,
            preemptions=self.preemptions,
            moves=self.moves,
            samples=self.samples,
            compute_bound=self.cap_flops / self.horizon / self.costs.flops_per_sample,
            network_bound=self.network_bound(),
            microbatch=self.B,
            events=events,
            wall_s=wallclock.perf_counter() - started,
            step_batch=self.step_batch,
            steps=min(self.completed),
            mean_round_s=self.round_time / self.rounds if self.rounds else 0.0,
            held_fraction=self.held_seconds(self.horizon) / slot_s if slot_s else 0.0,
            max_staleness=self.max_staleness,
            resent_samples=self.resent_samples,
            timeline=[
                ((i + 0.5) * self.bin_s / 3600.0, n / self.bin_s)
                for i, n in enumerate(self.bins[:-1])
            ],
        )
