"""The simulated strategies: SWARM (with and without rebalancing) and fixed GPipe-style pipelines.

Used by `python -m simulations.churn`; SWARM's choices come from swarm's own placement modules.
"""

from __future__ import annotations

import random
from collections import deque

from simulations.sim.core import (
    FAIL,
    LOADING,
    OFFLINE,
    ONLINE,
    READY,
    REBALANCE,
    REFRESH,
    RETRY,
    BaseSim,
    SimResult,
)
from simulations.sim.model import SimConfig
from swarm.peer import balancer
from swarm.peer.records import SpanRecord
from swarm.training.rebalance import StageStats, choose_join_stage, choose_move, training_join
from swarm.training.wiring import BACKWARD_TASK_FACTOR, NoReplica, StochasticWiring


def start_stage(replicas: list[int]) -> int:
    """The stage a peer starting with the run joins, given each stage's replicas so far.

    As `swarm.training.peer.TrainingPeer` places itself: while a stage has no peer it fills the
    gap with the serving span balancer (stages as one-block spans); then, nothing being measured
    yet, `training_join` picks the stage with the fewest replicas: a round-robin deal.
    """
    stages = len(replicas)
    if 0 in replicas:
        served = [SpanRecord(f"stage{s}", s, s + 1) for s in range(stages) if replicas[s]]
        return balancer.choose_span(served, stages, 1)[0]
    keys = [(s, s + 1) for s in range(stages)]
    return keys.index(training_join(keys, [0.0] * stages, replicas))


class SwarmSim(BaseSim):
    """Trainers route every hop with StochasticWiring over a DHT view that lags by a refresh.

    A hop on a peer that died fails after detect_s and is retried elsewhere (the peer is banned);
    completed hops are never redone, since the trainer keeps each stage's inputs. With
    rebalancing, peers periodically apply choose_move and joining peers pick the bottleneck.
    Stages step in the background by default (StepRules); each trainer keeps `window`
    microbatches in flight.
    """

    def __init__(self, cfg: SimConfig) -> None:
        super().__init__(cfg)
        self.rebalance = cfg.strategy == "swarm"
        S, N = self.S, self.N
        self.task_size = [self.B * (1.0 if h < S else BACKWARD_TASK_FACTOR) for h in range(2 * S)]
        # Per-sample link load of a peer in each stage: what it receives and what it sends on.
        down, up = [0.0] * S, [0.0] * S
        for h, nbytes in enumerate(self.hop_bytes()):
            down[self.stage_of[h]] += nbytes
            if h > 0:
                up[self.stage_of[h - 1]] += nbytes
        self.link_s = [max(d, u) / self.net.bytes_per_s for d, u in zip(down, up, strict=True)]
        self.stage_flops = [
            f + b for f, b in zip(self.costs.fwd_flops, self.costs.bwd_flops, strict=True)
        ]

        order = list(range(N))
        self.rng.shuffle(order)
        self.stage = [0] * N
        started = [0] * S
        for p in order:
            self.stage[p] = start_stage(started)
            started[self.stage[p]] += 1
        self.home = list(self.stage)
        self.incarnation = [0] * N
        self.name = [f"p{p}.0" for p in range(N)]
        self.peer_of = {n: p for p, n in enumerate(self.name)}
        self.moved_names: set[str] = set()
        self.members: list[set[str]] = [set() for _ in range(S)]
        self.stage_tp = [0.0] * S  # rebalancing's view: online and joining peers, samples/s
        self.replicas = [0] * S
        for p in range(N):
            self.members[self.stage[p]].add(self.name[p])
            self.stage_tp[self.stage[p]] += self.cap(p, self.stage[p])
            self.replicas[self.stage[p]] += 1
        self.version = [0] * S
        self.synced = [0] * S

        guess = self.cap(order[0], S // 2)
        self.wirings = [
            StochasticWiring(random.Random(cfg.seed * 104729 + i), default_throughput=guess)
            for i in range(self.trainers)
        ]
        for w in self.wirings:
            for s in range(S):
                w.set_peers(s, self.members[s])
        T = self.trainers
        count = T * self.window
        quota = self.window
        if cfg.target_batch:
            quota = max(1, round(cfg.target_batch / (T * self.B)))
        self.trainer = [m % T for m in range(count)]
        self.init_microbatches(count, self.trainer, quota, not cfg.background_averaging)
        self.mb_name = [""] * self.M
        self.stash = cfg.swarm_stash_inputs
        if self.stash:  # who ran each stage's forward of each microbatch
            self.fwd_name = [[""] * S for _ in range(self.M)]
        self.q.push(cfg.dht_refresh_s, REFRESH)
        if self.rebalance:
            for p in range(N):
                self.q.push(self.rng.uniform(0, cfg.rebalance_period_s), REBALANCE, p, 0)

    def handlers(self) -> dict:
        table = super().handlers()
        table.update({FAIL: self.fail, RETRY: self.retry, REFRESH: self.refresh})
        table[REBALANCE] = self.rebalance_check
        return table

    def hop_bytes(self) -> list[float]:
        # Stateless backward: each stage gets its input back with its output's gradient.
        return self.stashed_bytes() if self.cfg.swarm_stash_inputs else self.stateless_bytes()

    def cap(self, p: int, stage: int) -> float:
        """Samples/s peer p would sustain in `stage`: its compute or its link, the slower."""
        return 1.0 / max(self.stage_flops[stage] / self.speed[p], self.link_s[stage])

    # Routing

    def dispatch(self, t: float, m: int) -> None:
        h = self.pos[m]
        if self.stash and h >= self.S:
            name = self.fwd_name[m][self.stage_of[h]]
            p = self.peer_of.get(name, -1)
            if p >= 0 and self.name[p] == name and self.state[p] == ONLINE:
                self.mb_name[m] = name
                self.send(t, m, p)  # it kept the input: only the gradient travels
                return
            self.send_or_fail(t, m, h, self.bytes_full[h])
            return
        self.send_or_fail(t, m, h, None)

    def send_or_fail(self, t: float, m: int, h: int, nbytes: float | None) -> None:
        wiring = self.wirings[self.trainer[m]]
        try:
            name = wiring.choose(self.stage_of[h], t, self.task_size[h])
        except NoReplica:
            self.q.push(t + self.cfg.retry_wait_s, RETRY, m, self.attempt[m])
            return
        p = self.peer_of[name]
        self.mb_name[m] = name
        if self.name[p] != name or self.state[p] != ONLINE:
            # The view is stale: a moved peer refuses at once, a dead one times out.
            delay = 2 * self.net.latency_s if name in self.moved_names else self.cfg.detect_s
            self.q.push(t + delay, FAIL, m, self.attempt[m])
            return
        self.send(t, m, p, nbytes)

    def on_done(self, t: float, m: int, p: int, h: int) -> None:
        self.wirings[self.trainer[m]].report_success(
            self.mb_name[m], self.task_size[h], t - self.sent_at[m]
        )
        if self.stash and h < self.S:
            self.fwd_name[m][h] = self.mb_name[m]

    def retry(self, t: float, m: int, att: int) -> None:
        if att == self.attempt[m]:
            self.dispatch(t, m)

    def fail(self, t: float, m: int, att: int) -> None:
        if att != self.attempt[m]:
            return
        self.wirings[self.trainer[m]].report_failure(self.mb_name[m], t, self.cfg.ban_s)
        self.retries += 1
        self.redone_samples += self.B
        self.tries[m] += 1
        if self.tries[m] > self.cfg.max_retries:
            self.lost_samples += self.B
            self.wasted_flops += self.work[m]
            self.complete(t, m)
            return
        self.dispatch(t, m)

    def refresh(self, t: float, _a: int, _b: int) -> None:
        for s in range(self.S):
            if self.version[s] != self.synced[s]:
                for w in self.wirings:
                    w.set_peers(s, self.members[s])
                self.synced[s] = self.version[s]
        self.q.push(t + self.cfg.dht_refresh_s, REFRESH)

    # Membership

    def leave_stage(self, p: int) -> None:
        s = self.stage[p]
        if self.state[p] == ONLINE:
            self.members[s].discard(self.name[p])
            self.version[s] += 1
        self.stage_tp[s] -= self.cap(p, s)
        self.replicas[s] -= 1

    def join_stage(self, t: float, p: int, s: int, ready_at: float) -> None:
        self.stage[p] = s
        self.stage_tp[s] += self.cap(p, s)
        self.replicas[s] += 1
        self.incarnation[p] += 1
        self.name[p] = f"p{p}.{self.incarnation[p]}"
        self.peer_of[self.name[p]] = p
        self.state[p] = LOADING
        self.q.push(ready_at, READY, p, self.epoch[p])

    def stats(self) -> list[StageStats]:
        return [
            StageStats(1.0, max(self.stage_tp[s], 0.0), self.replicas[s]) for s in range(self.S)
        ]

    def averaging(self) -> bool:
        return any(len(members) > 1 for members in self.members)

    def averaging_group(self, stage: int) -> list[int]:
        # Sorted: a set's order changes with PYTHONHASHSEED, and event order with it.
        return sorted(self.peer_of[n] for n in self.members[stage])

    def owns(self, p: int, stage: int) -> bool:
        return self.stage[p] == stage and self.state[p] == ONLINE

    def resend_target(self, stage: int) -> int:
        names = sorted(self.members[stage])
        return self.peer_of[names[self.rng.randrange(len(names))]] if names else -1

    def may_preempt(self, p: int) -> bool:
        if not self.cfg.spare_last_replica:
            return True
        s = self.stage[p]
        online = [q for q in range(self.N) if self.stage[q] == s and self.state[q] == ONLINE]
        return self.state[p] == ONLINE and len(online) > 1

    def on_kill(self, t: float, p: int, tasks: list[int]) -> None:
        if self.state[p] != OFFLINE:
            if not self.legacy:
                self.drop_gradients(t, p, self.stage[p])
            self.leave_stage(p)
        for m in tasks:
            self.attempt[m] += 1
            self.q.push(t + self.cfg.detect_s, FAIL, m, self.attempt[m])

    def on_rejoin(self, t: float, p: int) -> None:
        self.state[p] = OFFLINE  # counted in no stage until it picks one
        s = choose_join_stage(self.stats()) if self.rebalance else self.home[p]
        self.join_stage(t, p, s, t + self.cfg.startup_s + self.load_s(s))

    def on_ready(self, t: float, p: int) -> None:
        s = self.stage[p]
        self.members[s].add(self.name[p])
        self.version[s] += 1
        if self.rebalance:
            period = self.cfg.rebalance_period_s
            self.q.push(t + self.rng.uniform(0.5, 1.5) * period, REBALANCE, p, self.epoch[p])

    def rebalance_check(self, t: float, p: int, epoch: int) -> None:
        if epoch != self.epoch[p] or self.state[p] != ONLINE:
            return  # dead or moving: its next READY schedules the next check
        old = self.stage[p]
        mine = [self.cap(p, s) for s in range(self.S)]
        target = choose_move(self.stats(), old, mine, self.cfg.min_gain)
        if target is None:
            period = self.cfg.rebalance_period_s
            self.q.push(t + self.rng.uniform(0.5, 1.5) * period, REBALANCE, p, epoch)
            return
        self.moves += 1
        if not self.legacy:
            self.drop_gradients(t, p, old)
        self.leave_stage(p)
        self.moved_names.add(self.name[p])
        # Queued work drains; work whose input has not arrived is refused and goes elsewhere.
        for m in sorted(self.inflight[p]):
            if self.c_start[m] < 0:
                self.inflight[p].discard(m)
                self.attempt[m] += 1
                self.q.push(t + 2 * self.net.latency_s, FAIL, m, self.attempt[m])
        drained = max(t, self.cfree[p])
        self.join_stage(t, p, target, drained + self.load_s(target))
        self.cfree[p] = drained


class PipelineSim(BaseSim):
    """k = peers // stages fixed pipelines, one peer per stage each; the rest are spares.

    Losing a peer stalls its pipeline: every microbatch in flight in it is redone (the dead peer
    held their stashed activations), and the pipeline waits until a spare or a rejoining peer has
    loaded the stage. Steps have a barrier: every pipeline finishes its share of the step, then
    each stage's peers all-reduce (matchmaking + transfer), then the next step starts; so all
    pipelines wait for a stalled one, and the one that lost a peer also redoes the microbatches
    it had finished this step (the dead peer's gradients for them are gone).
    """

    def __init__(self, cfg: SimConfig) -> None:
        super().__init__(cfg)
        S, N = self.S, self.N
        self.k = k = N // S
        order = list(range(N))
        self.rng.shuffle(order)
        self.slot = [[order[j * S + s] for s in range(S)] for j in range(k)]
        self.peer_slot: list[tuple[int, int] | None] = [None] * N
        for j in range(k):
            for s in range(S):
                self.peer_slot[self.slot[j][s]] = (j, s)
        self.spares = deque(order[k * S :])
        self.vacancies: deque[tuple[int, int]] = deque()
        # The trainers' microbatches in flight, shared out over the pipelines.
        per_pipe = max(1, round(self.trainers * self.window / k))
        quota = per_pipe
        if cfg.target_batch:
            quota = max(1, round(cfg.target_batch / (k * self.B)))
        self.pipe = [m // per_pipe for m in range(k * per_pipe)]
        self.init_microbatches(k * per_pipe, self.pipe, quota, blocking=True)
        self.pipe_mbs = [list(range(j * per_pipe, (j + 1) * per_pipe)) for j in range(k)]
        self.waiting: list[list[int]] = [[] for _ in range(k)]
        self.broken = [False] * k  # a slot is empty or loading: the pipeline stalls
        self.done_in_step = [0] * k  # microbatches finished this step, and where they were credited
        self.credited: list[list[int]] = [[] for _ in range(k)]

    def hop_bytes(self) -> list[float]:
        if self.cfg.pipeline_resends_inputs:
            return self.stateless_bytes()
        # Each stage kept its inputs: backward carries only the gradient (none into the last).
        return self.stashed_bytes()

    def dispatch(self, t: float, m: int) -> None:
        j = self.pipe[m]
        if self.broken[j]:
            self.waiting[j].append(m)
            return
        self.send(t, m, self.slot[j][self.stage_of[self.pos[m]]])

    def averaging_group(self, stage: int) -> list[int]:
        return [
            p
            for p in (self.slot[j][stage] for j in range(self.k))
            if p >= 0 and self.state[p] == ONLINE
        ]

    def credit(self, t: float, m: int) -> None:
        b = int(t / self.bin_s)
        self.bins[b] += self.B
        if not self.legacy:
            j = self.pipe[m]
            self.done_in_step[j] += 1
            self.credited[j].append(b)

    def on_barrier(self, t: float) -> None:
        self.done_in_step = [0] * self.k
        self.credited = [[] for _ in range(self.k)]

    def on_kill(self, t: float, p: int, tasks: list[int]) -> None:
        if p in self.spares:
            self.spares.remove(p)
        where = self.peer_slot[p]
        if where is None:
            return
        j, s = where
        self.slot[j][s] = -1
        self.peer_slot[p] = None
        self.broken[j] = True
        for m in self.pipe_mbs[j]:
            if not self.active[m]:
                continue  # held by the barrier: nothing in flight
            q = self.mb_peer[m]
            if q >= 0 and m in self.inflight[q]:
                self.inflight[q].discard(m)
                if q != p and self.c_start[m] >= 0:
                    # Another stage is computing it: that hop is thrown away too.
                    self.wasted_flops += self.hop_flops[self.pos[m]]
            if self.pos[m] > 0 or self.work[m] > 0:
                self.redone_samples += self.B
            self.wasted_flops += self.work[m]
            self.attempt[m] += 1
            self.restart(m)
        self.waiting[j] = [m for m in self.pipe_mbs[j] if self.active[m]]
        if not self.legacy:
            self.redo_step(t, j, p)
        if self.spares:
            q = self.spares.popleft()
            self.assign(q, j, s, t + self.load_s(s))
        else:
            self.vacancies.append((j, s))

    def redo_step(self, t: float, j: int, p: int) -> None:
        """Pipeline j lost peer p: what it finished this step must be computed again."""
        self.acc_peer[p] = 0
        n = self.done_in_step[j]
        if not n:
            return
        B = self.B
        self.step_done -= n
        self.samples -= n * B
        for b in self.credited[j]:
            self.bins[b] -= B
        self.redone_samples += n * B
        self.wasted_flops += n * B * self.costs.flops_per_sample
        self.done_in_step[j] = 0
        self.credited[j] = []
        if self.next_label[j] > self.step_no:
            self.next_label[j] = self.step_no
            self.issued[j] = self.quota
        self.issued[j] -= n
        self.release(t, j)

    def assign(self, p: int, j: int, s: int, ready_at: float) -> None:
        self.slot[j][s] = p
        self.peer_slot[p] = (j, s)
        self.state[p] = LOADING
        self.q.push(ready_at, READY, p, self.epoch[p])

    def on_rejoin(self, t: float, p: int) -> None:
        if self.vacancies:
            j, s = self.vacancies.popleft()
            self.assign(p, j, s, t + self.cfg.startup_s + self.load_s(s))
        else:
            self.q.push(t + self.cfg.startup_s, READY, p, self.epoch[p])

    def on_ready(self, t: float, p: int) -> None:
        where = self.peer_slot[p]
        if where is None:
            if self.vacancies:
                j, s = self.vacancies.popleft()
                self.assign(p, j, s, t + self.load_s(s))
            else:
                self.spares.append(p)
            return
        j, _ = where
        if all(q >= 0 and self.state[q] == ONLINE for q in self.slot[j]):
            self.broken[j] = False
            waiting, self.waiting[j] = self.waiting[j], []
            for m in waiting:
                self.dispatch(t, m)


def simulate(cfg: SimConfig) -> SimResult:
    """Run one configuration to its horizon and return its figures."""
    sim = PipelineSim(cfg) if cfg.strategy == "pipeline" else SwarmSim(cfg)
    return sim.run()
