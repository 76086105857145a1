"""Optimizer steps in the churn simulator: target batch, averaging rounds, staleness, barrier.

Mixed into simulations/sim/core.py's BaseSim; the strategies say which peers average a stage.
"""

from __future__ import annotations

from simulations.sim.network import SOURCE

# Event kinds after core's: a stage's round ends; a barrier's rounds end; resent backward calls;
# the next chunk of a peer's part in a background round.
ROUND, BARRIER, RESEND, RESENT, CHUNK = 10, 11, 12, 13, 14
_ONLINE = 2  # core.ONLINE (core imports this module)
# A background round's transfer goes in this many chunks per peer; each shares the peer's links
# with the activations queued there (processor sharing: a chunk of c seconds ends after
# c + min(c, queued), the queue ends c later), so neither starves the other.
ROUND_CHUNKS = 16


class StepRules:
    """When stages step, and when a trainer may send a microbatch.

    Issuers (SWARM's trainers, or the fixed pipelines) own microbatch slots (their in-flight
    window) and label every microbatch with the optimizer step it belongs to, `quota` per issuer
    per step, so a step is `step_batch` samples. Two ways to step:
    - background (SWARM, as swarm.training does by default): a stage starts a round when its
      replicas together hold step_batch samples; the round's all-reduce shares the replicas'
      links with activations (see ROUND_CHUNKS); gradients that arrive meanwhile count toward
      the next step. An issuer sends step k's microbatches only once every stage has finished
      step k - 2 and its own microbatches of step k - 2 are all done (at most one step stale).
    - blocking (the pipeline baseline; SWARM with background_averaging off): all of step k's
      microbatches finish, then every stage's round runs, then step k + 1 starts.
    A replica's gradients not yet in a round die with it. SWARM's trainer holds their inputs and
    resends those backward calls to another replica after detect_s; a fixed pipeline redoes the
    microbatches it had finished this step (PipelineSim). Rounds are not failed by a replica
    leaving mid-round (hivemind's would be; the replicas then step on their own gradients).

    Staleness is measured as swarm.training.trainer does: the step a stage counts a gradient
    toward minus the step its microbatch was sent for.
    """

    # Strategy interface

    def averaging_group(self, stage: int) -> list[int]:
        """The online peers of `stage` that average in a round starting now."""
        raise NotImplementedError

    def owns(self, p: int, stage: int) -> bool:
        """Whether peer p still serves `stage` (a moved peer's drained work does not count)."""
        return True

    def on_barrier(self, t: float) -> None:
        """Hook: a blocking step's microbatches are all done and its rounds start."""

    def resend_target(self, stage: int) -> int:
        """A peer to resend lost backward calls of `stage` to, or -1 if none is online now."""
        return -1

    # Setup

    def init_steps(self, issuer_of: list[int], quota: int, blocking: bool) -> None:
        issuers = max(issuer_of) + 1
        S, N = self.S, self.N
        self.blocking = blocking
        self.issuer = issuer_of
        self.quota = quota
        self.step_batch = quota * issuers * self.B
        self.label = [0] * self.M
        self.active = [False] * self.M
        self.next_label = [1] * issuers
        self.issued = [0] * issuers  # microbatches of next_label's step sent so far
        self.open: list[dict[int, int]] = [{} for _ in range(issuers)]  # step -> unfinished
        self.held: list[list[int]] = [[] for _ in range(issuers)]
        self.held_since = [0.0] * self.M
        self.held_s = 0.0  # slot-seconds spent held back by the staleness bound or the barrier
        self.completed = [0] * S  # optimizer steps each stage has finished
        self.running = [False] * S
        self.round_start = [0.0] * S
        self.acc = [0] * S  # background: samples toward the stage's next round
        self.acc_peer = [0] * N  # samples in each peer's gradients, not yet in a round
        self.step_no = 1  # blocking: the step being computed
        self.step_done = 0  # blocking: its microbatches finished or lost
        self.step_total = quota * issuers
        self.barrier_on = False
        self.barrier_start = 0.0
        self.pending_resends = 0
        self.resends: dict[int, tuple[int, int, int, int]] = {}
        self.resend_seq = 0
        self.resent_samples = 0
        self.rounds = 0
        self.round_time = 0.0
        self.max_staleness = 0
        self.round_left = [0] * S  # background: peers still sending their part of the round
        self.chunks_left = [0] * N
        self.chunk_stage = [0] * N

    def step_handlers(self) -> dict:
        return {
            ROUND: self.round_done,
            BARRIER: self.barrier_done,
            RESEND: self.resend,
            RESENT: self.resent,
            CHUNK: self.chunk,
        }

    # Issuing microbatches

    def issue(self, t: float, m: int) -> None:
        """Slot m is free: start its issuer's next microbatch, or hold the slot until allowed."""
        i = self.issuer[m]
        if self.may_issue(i):
            self.begin(t, m, i)
        else:
            self.active[m] = False
            self.held[i].append(m)
            self.held_since[m] = t

    def may_issue(self, i: int) -> bool:
        k = self.next_label[i]
        if self.blocking:
            return k == self.step_no
        if min(self.completed) < k - 2:
            return False
        opened = self.open[i]
        return not opened or min(opened) > k - 2

    def begin(self, t: float, m: int, i: int) -> None:
        k = self.next_label[i]
        self.label[m] = k
        self.open[i][k] = self.open[i].get(k, 0) + 1
        self.issued[i] += 1
        if self.issued[i] >= self.quota:
            self.issued[i] = 0
            self.next_label[i] = k + 1
        self.active[m] = True
        self.restart(m)
        self.dispatch(t, m)

    def finish(self, t: float, m: int) -> None:
        """Microbatch m is done (all hops) or lost: book it, then refill the window."""
        i, k = self.issuer[m], self.label[m]
        opened = self.open[i]
        opened[k] -= 1
        if not opened[k]:
            del opened[k]
        self.active[m] = False
        if self.blocking:
            self.step_done += 1
            self.maybe_barrier(t)
        self.release(t, i)
        self.issue(t, m)

    def release(self, t: float, i: int) -> None:
        held = self.held[i]
        while held and self.may_issue(i):
            m = held.pop()
            self.held_s += t - self.held_since[m]
            self.begin(t, m, i)

    def release_all(self, t: float) -> None:
        for i in range(len(self.held)):
            self.release(t, i)

    def held_seconds(self, now: float) -> float:
        """Slot-seconds held back so far, counting the slots still held at `now`."""
        return self.held_s + sum(now - self.held_since[m] for h in self.held for m in h)

    # Gradients and rounds

    def count_gradient(self, t: float, m: int, p: int, s: int) -> None:
        """The backward of microbatch m at stage s finished on peer p."""
        running = self.running[s]
        stale = self.completed[s] + 1 + running - self.label[m]
        if stale > self.max_staleness:
            self.max_staleness = stale
        if not self.owns(p, s):
            self.lose_gradients(t, s, self.B)
            return
        self.acc_peer[p] += self.B
        if not self.blocking:
            self.acc[s] += self.B
            if not running and self.acc[s] >= self.step_batch:
                self.start_round(t, s)

    def start_round(self, t: float, s: int) -> None:
        peers = self.averaging_group(s)
        for p in peers:
            self.acc_peer[p] = 0
        self.acc[s] = 0
        self.running[s] = True
        self.round_start[s] = t
        # A peer still sending a round of the stage it moved from sits this one out.
        peers = [p for p in peers if not self.chunks_left[p]]
        if len(peers) < 2:
            self.q.push(t, ROUND, s)  # alone: it steps at once
            return
        self.round_left[s] = len(peers)
        for p in peers:
            self.chunks_left[p] = ROUND_CHUNKS
            self.chunk_stage[p] = s
            self.q.push(t + self.cfg.matchmaking_s, CHUNK, p, self.epoch[p])

    def chunk(self, t: float, p: int, epoch: int) -> None:
        """Peer p queues the next chunk of its part of a background round on its links."""
        s = self.chunk_stage[p]
        end = t
        if epoch == self.epoch[p]:  # else it died: the others finish without it
            end = self.share_links(t, p, self.allreduce_s(s, self.round_left[s]) / ROUND_CHUNKS)
            self.chunks_left[p] -= 1
            if self.chunks_left[p]:
                self.q.push(end, CHUNK, p, epoch)
                return
        self.chunks_left[p] = 0
        self.round_left[s] -= 1
        if not self.round_left[s]:
            self.q.push(end + 2.0 * self.net.latency_s, ROUND, s)

    def share_links(self, t: float, p: int, duration: float) -> float:
        """`duration` seconds of averaging on p's links from t, shared with what is queued there
        (processor sharing of two flows); returns when it is through."""
        up, down = self.net.up_free, self.net.down_free
        queued = max(up[p], down[p]) - t
        up[p] = (up[p] if up[p] > t else t) + duration
        down[p] = (down[p] if down[p] > t else t) + duration
        return t + duration + min(duration, queued if queued > 0 else 0.0)

    def allreduce_s(self, s: int, g: int) -> float:
        """Seconds of link time each of g peers spends on a butterfly all-reduce of stage s:
        it sends and receives 2 (g - 1) / g of the averaged bytes."""
        nbytes = self.costs.params[s] * self.cfg.averaging_bytes_per_param
        return 2.0 * (g - 1) / g * nbytes / self.net.bytes_per_s

    def round_done(self, t: float, s: int, _b: int) -> None:
        self.running[s] = False
        self.completed[s] += 1
        self.rounds += 1
        self.round_time += t - self.round_start[s]
        if self.acc[s] >= self.step_batch:
            self.start_round(t, s)
        self.release_all(t)

    def round_end(self, t: float, s: int, peers: list[int]) -> float:
        """When a blocking round of stage s among `peers`, started at t, ends; reserves their
        links (idle at a barrier, but a resend may still be on them). Alone: at once."""
        g = len(peers)
        if g < 2:
            return t
        duration = self.allreduce_s(s, g)
        start = t + self.cfg.matchmaking_s
        end = max(self.share_links(start, p, duration) for p in peers)
        return end + 2.0 * self.net.latency_s

    # Blocking steps

    def maybe_barrier(self, t: float) -> None:
        if self.step_done >= self.step_total and not self.pending_resends and not self.barrier_on:
            self.barrier_on = True
            self.barrier_start = t
            self.on_barrier(t)
            end = t
            for s in range(self.S):
                end = max(end, self.round_end(t, s, self.averaging_group(s)))
            self.acc_peer = [0] * self.N
            self.q.push(end, BARRIER)

    def barrier_done(self, t: float, _a: int, _b: int) -> None:
        self.barrier_on = False
        self.rounds += 1
        self.round_time += t - self.barrier_start
        self.completed = [c + 1 for c in self.completed]
        self.step_no += 1
        self.step_done = 0
        self.release_all(t)

    # Gradients lost with a replica (SWARM: the trainer resends the backward calls)

    def drop_gradients(self, t: float, p: int, s: int) -> None:
        """Peer p leaves stage s: the gradients it had not yet averaged are lost."""
        n = self.acc_peer[p]
        if n:
            self.acc_peer[p] = 0
            if not self.blocking:
                self.acc[s] -= n
            self.lose_gradients(t, s, n)

    def lose_gradients(self, t: float, s: int, n: int) -> None:
        """n samples' gradients at stage s are gone: resend them, a microbatch per call."""
        self.wasted_flops += n * self.hop_flops[2 * self.S - 1 - s] / self.B
        self.resent_samples += n
        while n > 0:
            part = min(n, self.B)
            n -= part
            self.pending_resends += 1
            self.q.push(t + self.cfg.detect_s, RESEND, s, part)

    def resend(self, t: float, s: int, n: int) -> None:
        q = self.resend_target(s)
        if q < 0:
            self.q.push(t + self.cfg.retry_wait_s, RESEND, s, n)
            return
        h = 2 * self.S - 1 - s
        arrival = self.net.transfer(SOURCE, q, n * self.bytes_full[h] / self.B, t)
        start = self.cfree[q] if self.cfree[q] > arrival else arrival
        end = start + n * self.hop_flops[h] / self.B / self.speed[q]
        self.cfree[q] = end
        self.resend_seq += 1
        self.resends[self.resend_seq] = (s, q, n, self.epoch[q])
        self.q.push(end, RESENT, self.resend_seq)

    def resent(self, t: float, rid: int, _b: int) -> None:
        s, q, n, epoch = self.resends.pop(rid)
        if epoch != self.epoch[q] or self.state[q] != _ONLINE or not self.owns(q, s):
            self.q.push(t + self.cfg.detect_s, RESEND, s, n)  # that replica left too
            return
        self.pending_resends -= 1
        self.acc_peer[q] += n
        if self.blocking:
            self.maybe_barrier(t)
        else:
            self.acc[s] += n
            if not self.running[s] and self.acc[s] >= self.step_batch:
                self.start_round(t, s)
