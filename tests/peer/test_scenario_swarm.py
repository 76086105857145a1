"""Scenarios with real peer processes: --stage auto covers the model, status shows it, a killed
peer's blocks are covered again, SIGTERM drains. Tests swarm/peer/server.py and swarm/cli/peer.py.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import pytest
import torch

from swarm.dht import make_dht
from swarm.errors import PeerUnavailable
from swarm.peer.client import PeerClient
from swarm.peer.dht_view import fetch_swarm
from tests.conftest import REPO, wait_for

ANNOUNCE, REBALANCE = 1.0, 3.0


def _coverage(records, n=6) -> list[int]:
    cover = [0] * n
    for r in records:
        if r.state == "online":
            for b in range(r.start, r.end):
                cover[b] += 1
    return cover


def _status(maddrs: list[str], model: str, *flags: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "swarm.cli.peer", "status", "--initial-peers", *maddrs]
        + ["--model", model, *flags],
        capture_output=True,
        timeout=120,
        cwd=REPO,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_scenario_auto_cover_kill_and_drain(tiny_model_dir, peer_factory):
    common = [
        "--model",
        str(tiny_model_dir),
        "--stage",
        "auto",
        "--num-blocks",
        "3",
        "--announce-period",
        str(ANNOUNCE),
        "--rebalance-period",
        str(REBALANCE),
        "--max-start-delay",
        "3",
        "--shutdown-grace",
        "3",
    ]
    boot = peer_factory("join", *common, "--seed", "0")
    maddrs = boot.wait_maddrs(90)
    others = [
        peer_factory("join", *common, "--seed", str(i), "--initial-peers", *maddrs)
        for i in (1, 2, 3)
    ]
    for p in others:
        p.wait_maddrs(90)
    dht = make_dht(initial_peers=maddrs, client_mode=True, start=True)
    try:
        name = tiny_model_dir.name

        def covered():
            records = fetch_swarm(dht, name, 6)
            online = [r for r in records if r.state == "online"]
            return len(online) == 4 and min(_coverage(records)) >= 1 and records

        records = wait_for(covered, 120, 0.5, "4 auto peers to cover all 6 blocks")

        # status --json shows every block served.
        table = json.loads(_status(maddrs, name, "--json"))
        assert table["model"] == name and table["num_blocks"] == 6
        assert len(table["peers"]) == 4 and table["uncovered"] == []
        # The table people read: one row per peer and span, then the coverage line.
        text = _status(maddrs, name).splitlines()
        assert text[0] == f"model {name}: 6 blocks, 4 peers" and len(text) == 2 + 4 + 1, text
        assert text[-1].startswith("coverage: every block served, by at least "), text
        assert all(line.split()[-1] == "inference" for line in text[2:-1]), text
        assert all(
            any(p["state"] == "online" for p in block["peers"]) for block in table["blocks"]
        ), table
        peer = table["blocks"][0]["peers"][0]
        assert {"peer_id", "start", "end", "state", "throughput", "cache_tokens_left"} <= set(peer)

        # SIGKILL a non-bootstrap peer, preferring one whose blocks nobody else serves.
        by_id = {p.peer_id: p for p in others}
        spans = {r.peer_id: r for r in records}

        def lonely(pid):
            r = spans[pid]
            return any(_coverage(records)[b] == 1 for b in range(r.start, r.end))

        victim_id = sorted(by_id, key=lambda pid: not lonely(pid))[0]
        victim = by_id.pop(victim_id)
        victim.kill()
        t0 = time.monotonic()

        def recovered():
            recs = [r for r in fetch_swarm(dht, name, 6) if r.peer_id != victim_id]
            gone = victim_id not in {r.peer_id for r in fetch_swarm(dht, name, 6)}
            return gone and min(_coverage(recs)) >= 1

        # Records expire after 2 announce periods; then moves happen at the next checks.
        wait_for(recovered, 2 * ANNOUNCE + 2 * REBALANCE * 1.5 + 20, 0.3, "blocks covered again")
        elapsed = time.monotonic() - t0
        print(f"recovered {elapsed:.1f} s after SIGKILL")

        # SIGTERM: offline at once, no new sessions, in-flight work finishes, clean exit.
        target = boot

        async def drain_check():
            p2p = await dht.replicate_p2p()
            client = PeerClient(p2p)
            rec = next(r for r in fetch_swarm(dht, name, 6) if r.peer_id == target.peer_id)
            session = await client.open_inference(target.peer_id, rec.start, rec.end, 8)
            target.proc.send_signal(15)
            await asyncio.sleep(1.0)
            state = {r.peer_id: r.state for r in fetch_swarm(dht, name, 6)}[target.peer_id]
            assert state == "offline"
            with pytest.raises(PeerUnavailable):
                await client.open_inference(target.peer_id, rec.start, rec.end, 8)
            out = await session.step(torch.randn(1, 2, 64), 0)  # in flight: still served
            assert out.shape == (1, 2, 64)
            await session.close()

        asyncio.run(drain_check())
        assert target.proc.wait(30) == 0
    finally:
        dht.shutdown()
