"""Tests of the simulated strategies on small cases with known answers, and of the CLI contract.

Run by pytest; each case simulates a few virtual hours of a handful of peers in well under a second.
"""

import json

import pytest

import swarm.peer.balancer as real_balancer
import swarm.training.rebalance as real_rebalance
import swarm.training.wiring as real_wiring
from simulations import churn
from simulations.sim import strategies
from simulations.sim.model import SimConfig, auto_microbatch, load_calibration, stage_costs
from simulations.sim.strategies import simulate
from swarm.peer.config import PeerConfig

FAST_NET = dict(bandwidth_mbps=1e7, latency_ms=0.0, speed_sigma=0.0)


def small(**kw):
    base = dict(
        peers=8, stages=2, hidden=256, layers=4, seq_len=64, vocab=512, hours=1.0, max_hops=20_000
    )
    base.update(kw)
    return SimConfig(**base)


def long_steps(cfg, windows=20):
    """cfg with steps of `windows` in-flight windows and no matchmaking wait: a barrier's fill and
    drain then cost about 1 / windows of a step."""
    micro = auto_microbatch(cfg, stage_costs(cfg))
    slots = round(cfg.in_flight_per_peer * cfg.peers)
    return cfg.replace(target_batch=windows * slots * micro, matchmaking_s=0.0)


def test_uses_the_real_wiring_and_rebalancing():
    assert strategies.StochasticWiring is real_wiring.StochasticWiring
    assert strategies.choose_move is real_rebalance.choose_move
    assert strategies.choose_join_stage is real_rebalance.choose_join_stage
    assert strategies.balancer is real_balancer
    assert SimConfig().min_gain == PeerConfig.min_gain  # one default, `swarm-peer --min-gain`


def test_starting_peers_fill_gaps_then_join_the_fewest_replicas():
    replicas, picks = [0, 0, 0], []
    for _ in range(7):
        picks.append(strategies.start_stage(replicas))
        replicas[picks[-1]] += 1
    assert picks == [0, 1, 2, 0, 1, 2, 0]
    assert strategies.start_stage([2, 0, 1, 0]) == 1  # the span balancer fills the first gap


def test_one_peer_pipeline_is_compute_bound():
    cfg = small(peers=1, stages=1, strategy="pipeline", **FAST_NET)
    costs = stage_costs(cfg)
    expected = costs.median_speed / costs.flops_per_sample
    r = simulate(cfg)
    assert r.throughput == pytest.approx(expected, rel=0.01)
    assert r.utilisation == pytest.approx(1.0, rel=0.01)


@pytest.mark.parametrize("strategy", ["swarm", "swarm-norebalance", "pipeline"])
def test_equal_peers_reach_the_compute_bound(strategy):
    # Equal peers, free links, equal stages (no LM head): every strategy is compute bound. SWARM
    # averages in the background; the pipeline's barrier costs a fill and drain per step, small
    # when a step is many windows and there is no matchmaking wait.
    cfg = small(strategy=strategy, vocab=1, **FAST_NET)
    if strategy == "pipeline":
        cfg = long_steps(cfg)
    r = simulate(cfg)
    assert r.throughput == pytest.approx(r.compute_bound, rel=0.03)
    assert r.lost_samples == 0 and r.wasted_fraction == 0.0
    assert r.steps > 10 and r.max_staleness <= 1


def test_slow_links_give_the_network_bound():
    # Fast peers on 1 MB/s links: stage 0's downlink takes the tokens and the gradient back.
    cfg = long_steps(
        small(
            peers=2,
            strategy="pipeline",
            speed_tflops=1e6,
            bandwidth_mbps=8.0,
            latency_ms=0.0,
            speed_sigma=0.0,
            averaging_bytes_per_param=0.0,
        )
    )
    costs = stage_costs(cfg)
    r = simulate(cfg)
    assert r.network_bound == pytest.approx(1e6 / (costs.act_bytes + costs.token_bytes))
    assert r.throughput == pytest.approx(r.network_bound, rel=0.03)


def test_deterministic_for_a_seed():
    cfg = small(peers=16, preempt_per_hour=30, hours=2.0)
    a, b = simulate(cfg).to_dict(), simulate(cfg).to_dict()
    a.pop("wall_s"), b.pop("wall_s")
    assert a == b
    c = simulate(cfg.replace(seed=1)).to_dict()
    c.pop("wall_s")
    assert c != a


def test_swarm_retries_instead_of_losing_and_pipeline_redoes():
    kw = dict(peers=16, preempt_per_hour=40, hours=3.0, rejoin_delay_s=300.0)
    s = simulate(small(strategy="swarm", **kw))
    p = simulate(small(strategy="pipeline", **kw))
    assert s.preemptions == p.preemptions > 50  # the same preemption times for both
    assert s.lost_samples == 0 and s.retries > 0
    assert p.lost_samples == 0 and p.redone_samples > 0 and p.wasted_fraction > 0
    # Pipelines lose whole pipelines' work in flight; SWARM only the hop on the dead peer.
    assert p.wasted_fraction > s.wasted_fraction


def test_swarm_keeps_more_of_its_throughput_under_churn():
    # 10/h over 32 peers: each peer is preempted every 3.2 h on average (the big sweep's 40/h
    # over 400 peers is every 10 h). A lost pipeline peer holds every pipeline at the barrier.
    kw = dict(peers=32, stages=4, hours=8.0, max_hops=40_000, rejoin_delay_s=600.0)
    keep = {}
    for strategy in ("swarm", "pipeline"):
        calm = simulate(small(strategy=strategy, **kw)).throughput
        churned = simulate(small(strategy=strategy, preempt_per_hour=10, **kw)).throughput
        keep[strategy] = churned / calm
    assert keep["swarm"] > 3 * keep["pipeline"]
    assert keep["swarm"] > 0.8


def test_rebalancing_fills_the_heavy_stage():
    # A big vocabulary makes the last stage (LM head) the bottleneck; rebalancing moves peers.
    kw = dict(peers=16, vocab=20000, hours=2.0, **FAST_NET)
    moved = simulate(small(strategy="swarm", **kw))
    fixed = simulate(small(strategy="swarm-norebalance", **kw))
    assert moved.moves > 0 and fixed.moves == 0
    assert moved.throughput > 1.2 * fixed.throughput


def test_cli_json_contract(capsys, tmp_path):
    args = ["--peers", "8", "--stages", "2", "--hidden", "256", "--layers", "4", "--hours", "0.5"]
    args += ["--max-hops", "2000"]
    assert churn.main(args + ["--strategy", "swarm", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    data = json.loads(out[0])
    assert {"throughput", "utilisation", "lost_samples"} <= set(data)
    png = tmp_path / "sweep.png"
    assert (
        churn.main(args + ["--sweep", "preempt-per-hour=0,20", "--json", "--plot", str(png)]) == 0
    )
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert len(rows) == 6 and [r["preempt_per_hour"] for r in rows[::3]] == [0.0, 20.0]
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert churn.main(args) == 0  # the table
    assert "pipeline" in capsys.readouterr().out
    # The step rules are flags too, generated from SimConfig like the rest.
    more = ["--target-batch", "4000", "--inflight", "8", "--matchmaking-s", "0.5"]
    more += ["--background-averaging", "0", "--strategy", "swarm-norebalance", "--json"]
    assert churn.main(args + more) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["lost_samples"] == 0 and data["max_staleness"] == 0
    micro = data["microbatch"]
    assert data["step_batch"] == max(1, round(4000 / micro)) * micro  # one trainer


def test_calibration_file(tmp_path):
    path = tmp_path / "cal.json"
    path.write_text(json.dumps({"compute_per_sample_s": 0.5, "bandwidth_mbps": 90}))
    values = load_calibration(path)
    cfg = small(**values)
    costs = stage_costs(cfg)
    middle = cfg.stages // 2
    per_sample = (costs.fwd_flops[middle] + costs.bwd_flops[middle]) / costs.median_speed
    assert per_sample == pytest.approx(0.5)
    path.write_text(json.dumps({"nonsense": 1}))
    with pytest.raises(ValueError):
        load_calibration(path)
    assert churn.main(["--calibration", str(path)]) == 2
