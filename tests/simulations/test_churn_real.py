"""The real-process churn harness: one small scenario with real peers, a trainer and one SIGKILL.

Covers simulations/churn_harness.py (the harness of simulations/churn_real.py) end to end;
every process the harness started must be gone.
"""

from __future__ import annotations

import os
import signal

import pytest

from simulations.churn_harness import HarnessConfig, run_harness, spans
from swarm.procs import alive


def test_spans_cover_the_model_half_open() -> None:
    assert spans(6, 2) == ["0:3", "3:6"]
    for layers, stages in ((6, 4), (30, 3), (7, 7)):
        cuts = [tuple(map(int, s.split(":"))) for s in spans(layers, stages)]
        assert len(cuts) == stages and cuts[0][0] == 0 and cuts[-1][1] == layers
        assert all(a < b for a, b in cuts) and all(
            x[1] == y[0] for x, y in zip(cuts[:-1], cuts[1:], strict=True)
        )


def test_generate_mode_is_refused_until_the_client_lands() -> None:
    with pytest.raises(ValueError, match="generate"):
        HarnessConfig(mode="generate").validate()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_scenario_one_kill_and_restart_loses_nothing(tmp_path) -> None:
    cfg = HarnessConfig(
        peers=4,
        stages=2,
        steps=10,
        kill_every=8.0,
        kill_signal="KILL",
        restart_after=1.0,
        max_kills=1,
        max_wall=170.0,
        workdir=str(tmp_path),
    )
    result = None
    try:
        result = run_harness(cfg)
        assert result.kills == 1 and result.restarts == 1
        assert result.finished, (tmp_path / "trainer-5.log").read_text(errors="replace")[-2000:]
        assert result.lost == 0
        assert result.throughput > 0 and result.steps == cfg.steps
        # Bootstrap, 4 peers, the restarted one, the trainer, and their DHT forks and p2pds.
        assert len(result.pids) >= 7
        assert result.left_running == []
        assert not [pid for pid, start in result.pids if alive(pid, start)]
    finally:
        for pid, start in result.pids if result else []:
            if alive(pid, start):  # never leave a process behind, even when an assertion failed
                os.kill(pid, signal.SIGKILL)
