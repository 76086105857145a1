"""The training benchmark's rows (simulations/bench_training.py): a churn row without a kill or a
stalled run says so instead of passing for a churn figure."""

from __future__ import annotations

import argparse

from simulations.bench_training import describe

ARGS = argparse.Namespace(steps=20, kill_every=30.0, max_wall=300.0)
ROW = {
    "samples_per_s": 2.5,
    "steps": 20,
    "lost": 0,
    "retries": 0,
    "kills": 0,
    "first_loss": 5.6,
    "last_loss": 2.1,
    "finished": True,
    "cut_at_max_wall": False,
    "exit_code": 0,
    "churn": True,
}


def test_a_churn_row_without_kills_says_no_kill_happened() -> None:
    assert "no kill happened" in describe(ROW, ARGS)
    assert "no kill" not in describe({**ROW, "kills": 2}, ARGS)
    assert "(" not in describe({**ROW, "churn": False}, ARGS)


def test_a_stalled_run_shows_lost_as_unknown() -> None:
    cut = {**ROW, "kills": 9, "lost": None, "finished": False, "cut_at_max_wall": True}
    line = describe({**cut, "steps": 7}, ARGS)
    assert "lost  -" in line and "stalled" in line and "None" not in line
    assert "every step done" in describe(cut, ARGS)  # cut while waiting for its summary
