"""Tests of the churn simulator's step rules: target batch, rounds, staleness bound, barrier.

Run by pytest; each case simulates a few virtual hours of a handful of peers in under a second.
"""

import pytest

from simulations.sim.model import SimConfig, auto_microbatch, stage_costs
from simulations.sim.strategies import PipelineSim, SwarmSim, simulate

FAST_NET = dict(bandwidth_mbps=1e7, latency_ms=0.0, speed_sigma=0.0)


def small(**kw):
    base = dict(
        peers=8, stages=2, hidden=256, layers=4, seq_len=64, vocab=1, hours=1.0, max_hops=20_000
    )
    base.update(kw)
    return SimConfig(**base)


def step_of(cfg, windows):
    """A target batch of `windows` in-flight windows of cfg's (auto) microbatches."""
    micro = auto_microbatch(cfg, stage_costs(cfg))
    return windows * round(cfg.in_flight_per_peer * cfg.peers) * micro


def test_a_blocking_round_costs_matchmaking_plus_the_allreduce():
    # Two pipelines of two stages: each stage's two peers all-reduce at the barrier, on idle links.
    cfg = small(peers=4, strategy="pipeline", bandwidth_mbps=80.0, latency_ms=10.0)
    costs = stage_costs(cfg)
    allreduce = max(2 * 0.5 * p * 8.0 / 10e6 for p in costs.params)  # 8 B/param at 10 MB/s
    r = simulate(cfg)
    assert r.steps > 3
    assert r.mean_round_s == pytest.approx(1.0 + allreduce + 2 * 0.01, rel=1e-6)


def test_the_pipeline_barrier_costs_its_rounds_and_background_averaging_hides_them():
    base = small(**FAST_NET)
    target = step_of(base, 4)
    rates = {}
    for strategy in ("pipeline", "swarm-norebalance"):
        free = simulate(base.replace(strategy=strategy, target_batch=target, matchmaking_s=0.0))
        step_s = free.step_batch / free.throughput
        wait = 0.5 * step_s
        slow = simulate(base.replace(strategy=strategy, target_batch=target, matchmaking_s=wait))
        rates[strategy] = (free, slow, step_s, wait)
    free, slow, step_s, wait = rates["pipeline"]
    # Nothing computes during the barrier's round: each step takes `wait` longer.
    assert slow.throughput == pytest.approx(slow.step_batch / (step_s + wait), rel=0.03)
    free, slow, _, _ = rates["swarm-norebalance"]
    assert slow.throughput >= 0.97 * free.throughput  # the round overlaps the next step
    assert slow.max_staleness <= 1


@pytest.mark.parametrize(
    "kw",
    [
        dict(**FAST_NET, matchmaking_s=5.0),  # rounds wait, links are free
        dict(speed_sigma=0.0, bandwidth_mbps=20.0, averaging_bytes_per_param=64.0),  # all-reduce
        dict(peers=16, preempt_per_hour=10.0, hours=3.0),  # churn
    ],
)
def test_background_averaging_is_never_slower_than_a_blocking_round(kw):
    cfg = small(strategy="swarm-norebalance", **kw)
    cfg = cfg.replace(target_batch=step_of(cfg, 1))
    background = simulate(cfg)
    blocking = simulate(cfg.replace(background_averaging=False))
    assert background.throughput >= blocking.throughput
    assert background.lost_samples == blocking.lost_samples == 0
    assert background.max_staleness <= 1 and blocking.max_staleness == 0


class _Recorder(SwarmSim):
    """SwarmSim that checks the staleness bound at every microbatch it sends."""

    def begin(self, t, m, i):
        k = self.next_label[i]
        self.leads.append(k - min(self.completed))
        assert all(step > k - 2 for step in self.open[i])  # our own step k - 2 is done
        super().begin(t, m, i)


def test_trainers_stay_within_one_step_of_the_slowest_stage():
    # Rounds far longer than a step: the bound holds the trainers back, and they wait.
    cfg = small(strategy="swarm-norebalance", **FAST_NET)
    free = simulate(cfg.replace(matchmaking_s=0.0))
    step_s = free.step_batch / free.throughput
    cfg = cfg.replace(matchmaking_s=3 * step_s, hours=2.0)
    sim = _Recorder(cfg)
    sim.leads = []
    r = sim.run()
    assert max(sim.leads) == 2  # step k goes out once every stage has finished k - 2
    assert r.max_staleness <= 1
    assert r.held_fraction > 0.3
    # A step per round: the stages' rounds, not compute, set the pace.
    assert r.throughput == pytest.approx(r.step_batch / (3 * step_s), rel=0.1)


@pytest.mark.parametrize("strategy", ["swarm", "swarm-norebalance"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_trainer_under_churn_is_at_most_one_step_stale(strategy, seed):
    cfg = small(peers=32, stages=4, peers_per_trainer=32, preempt_per_hour=20.0, hours=3.0)
    r = simulate(cfg.replace(strategy=strategy, rejoin_delay_s=300.0, seed=seed))
    assert r.preemptions > 30 and r.resent_samples > 0  # dead replicas' gradients went again
    assert r.lost_samples == 0 and r.max_staleness == 1 and r.steps > 20


def test_several_trainers_can_count_a_late_microbatch_two_steps_on():
    # The bound is on sending: a microbatch that retries while the other trainers fill two of
    # its stages' steps counts two steps after the step it was sent for (as in swarm.training).
    cfg = small(peers=32, stages=4, peers_per_trainer=8, preempt_per_hour=20.0, hours=3.0)
    cfg = cfg.replace(strategy="swarm-norebalance", rejoin_delay_s=300.0)
    sim = _Recorder(cfg.replace(seed=2))
    sim.leads = []
    r = sim.run()
    assert max(sim.leads) <= 2 and r.max_staleness == 2 and r.lost_samples == 0


def test_the_window_pipelines_microbatches_through_the_stages():
    # One trainer, long links, fast compute: throughput grows with what it keeps in flight.
    cfg = small(
        strategy="swarm-norebalance",
        peers=4,
        peers_per_trainer=4,
        latency_ms=500.0,
        speed_sigma=0.0,
        microbatch=16,
        hours=0.5,
    )
    cfg = cfg.replace(target_batch=256, matchmaking_s=0.0)  # steps of 16 microbatches
    one = simulate(cfg.replace(inflight=1))
    four = simulate(cfg.replace(inflight=4))
    assert four.throughput == pytest.approx(4 * one.throughput, rel=0.1)


def test_target_batch_is_whole_microbatches_and_steps_count_it():
    cfg = small(strategy="pipeline", **FAST_NET)
    micro = auto_microbatch(cfg, stage_costs(cfg))
    r = simulate(cfg.replace(target_batch=41 * micro))
    assert r.step_batch == 4 * 10 * micro  # 4 pipelines x round(41 / 4) microbatches
    # The horizon may end a step between its last microbatch and the end of its rounds.
    assert r.steps * r.step_batch <= r.samples <= (r.steps + 1) * r.step_batch


def test_a_stalled_pipeline_holds_every_pipeline():
    # Two pipelines, no spare; one peer dies at 0.5 h and is not back before the end (1 h).
    cfg = small(
        peers=4,
        strategy="pipeline",
        periodic_churn=True,
        preempt_per_hour=1.99,
        rejoin_delay_s=7200.0,
        **FAST_NET,
    )
    calm = simulate(cfg.replace(preempt_per_hour=0.0))
    sim = PipelineSim(cfg)
    r = sim.run()
    assert r.preemptions == 1
    # Nothing steps after the death: the other pipeline finishes its share, then waits.
    assert r.samples <= calm.samples * 0.51 + calm.step_batch
    late = sum(sim.bins[len(sim.bins) * 52 // 100 :])
    assert late <= calm.step_batch / 2  # at most the healthy pipeline's last share
    assert r.held_fraction > 0.4 and r.redone_samples > 0 and r.lost_samples == 0


def test_stateless_backward_costs_a_third_more_link_time_per_sample():
    cfg = small(peers=8, stages=4, vocab=1)
    swarm = SwarmSim(cfg.replace(strategy="swarm")).network_bound()
    stash = SwarmSim(cfg.replace(strategy="swarm", swarm_stash_inputs=True)).network_bound()
    pipe = PipelineSim(cfg.replace(strategy="pipeline")).network_bound()
    resend = PipelineSim(cfg.replace(strategy="pipeline", pipeline_resends_inputs=True))
    # A middle stage receives 3 activations per sample (input, input + gradient) against 2.
    assert stash == pytest.approx(pipe) and resend.network_bound() == pytest.approx(swarm)
    assert pipe / swarm == pytest.approx(1.5, rel=0.01)


def test_swarm_stash_variant_sends_backward_to_the_forward_replica():
    cfg = small(strategy="swarm-norebalance", speed_tflops=1e4, bandwidth_mbps=50.0)
    plain, stash = simulate(cfg), simulate(cfg.replace(swarm_stash_inputs=True))
    assert stash.throughput > 1.2 * plain.throughput and stash.lost_samples == 0
