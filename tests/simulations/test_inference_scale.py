"""The inference scale simulation: churn makes failovers, coverage holds, push beats relay.

Tests simulations/inference_scale.py on a small world (a few seconds).
"""

from __future__ import annotations

import json

from simulations.inference_scale import ScaleConfig, World, main, one_way_s

SMALL = dict(peers=60, clients=4, blocks=24, hours=0.2, warmup_min=3.0, mean_lifetime_h=0.15)


def test_churn_causes_failovers_and_sessions_go_on():
    r = World(ScaleConfig(**SMALL)).run()
    assert r["tokens"] > 0 and r["failovers"] > 0
    assert r["min_replicas"] >= 1 and r["max_uncovered_blocks"] == 0
    assert 0 < r["tokens_per_s_per_client"]["p10"] <= r["tokens_per_s_per_client"]["p90"]
    assert r["recovery_s"]["p50"] >= ScaleConfig.detect_s


def test_runs_repeat_for_a_seed_and_push_beats_relay():
    a = World(ScaleConfig(**SMALL, seed=3)).run()
    b = World(ScaleConfig(**SMALL, seed=3)).run()
    strip = {"wall_s", "route_ms"}
    assert {k: v for k, v in a.items() if k not in strip} == {
        k: v for k, v in b.items() if k not in strip
    }
    push = World(ScaleConfig(**SMALL, seed=3, mode="push")).run()
    assert push["tokens_per_s_per_client"]["p50"] > a["tokens_per_s_per_client"]["p50"]


def test_latency_grows_with_distance_and_the_cli_prints_json(capsys):
    here, near, far = (0.0, 0.0), (0.0, 0.1), (0.0, 3.1)
    assert 0.005 <= one_way_s(here, here) < one_way_s(here, near) < one_way_s(here, far) <= 0.15
    assert (
        main(["--peers", "40", "--clients", "2", "--blocks", "12", "--hours", "0.05", "--json"])
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert {"tokens_per_s_per_client", "failovers", "min_replicas", "samples"} <= set(out)
