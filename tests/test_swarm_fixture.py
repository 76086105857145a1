"""The scenario tests' swarm opening (tests/conftest.py `swarm_factory`) with real peer processes:
what its Swarm reports, and that kill() leaves no DHT process or p2pd behind.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from swarm.model.calibration_cache import cache_root


def test_the_session_cache_is_a_temp_dir_not_the_home_folder(mesh_cache, throughput_cache):
    assert cache_root() == mesh_cache == throughput_cache.parent
    assert not cache_root().is_relative_to(Path.home() / ".cache")
    assert os.environ["SWARM_MESH_CACHE"] == str(mesh_cache)  # what peer subprocesses inherit


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_scenario_swarm_factory_reports_its_peers_and_kill_reaps_their_children(swarm_factory):
    s = swarm_factory({"a": "0:3", "b": "3:6"}, extra={"b": ["--announce-period", "2"]})
    assert s.maddrs["a"] == s.boot
    assert all(m.endswith(f"/p2p/{s.peer_ids[name]}") for name, ms in s.maddrs.items() for m in ms)
    assert s.pids == {name: p.proc.pid for name, p in s.peers.items()}
    assert {r.peer_id: (r.start, r.end) for r in s.online()} == {
        s.peer_ids["a"]: (0, 3),
        s.peer_ids["b"]: (3, 6),
    }
    assert "--announce-period" in s.peers["b"].args and "--announce-period" not in s.peers["a"].args
    b = s.peers["b"]
    assert len(b.noted_children) >= 2, "its DHT process and p2pd were not noted"
    s.kill("b")
    assert b.proc.returncode == -signal.SIGKILL
    assert not b.children_alive()  # reaped by pid at once, not left to the peer's watchdog
    assert s.peers["a"].proc.poll() is None  # the others serve on
