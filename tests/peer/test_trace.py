"""Step tracing (swarm.trace): a real peer process with SWARM_MESH_TRACE set notes each step's
stages in order, and bench_peer's timeline turns stage times into per-hop costs."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from hivemind.p2p import P2P

from simulations.bench_peer import timeline
from swarm import trace
from swarm.peer.client import PeerClient
from tests.conftest import PeerProcess

STEP_STAGES = ["request", "input", "compute_start", "compute_end", "replied"]


@pytest.mark.timeout(180)
def test_a_traced_peer_notes_each_steps_stages_in_order(tiny_model_dir, tmp_path, throughput_cache):
    folder = tmp_path / "trace"
    folder.mkdir()
    env = {"SWARM_MESH_CACHE": str(throughput_cache.parent), trace.ENV: str(folder)}
    args = ["join", "--model", str(tiny_model_dir), "--stage", "0:3", "--quant", "none"]
    peer = PeerProcess(args, env, tmp_path / "peer.log")
    try:
        peer.wait_maddrs(90)
        peer.wait_log("serving blocks", 120)

        async def steps() -> list[tuple[float, float]]:
            p2p = await P2P.create(initial_peers=peer.maddrs, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
            try:
                client = PeerClient(p2p)
                stream = await client.open_inference(peer.peer_id, 0, 3, max_length=8)
                times = []
                for pos in range(3):
                    t0 = time.perf_counter()
                    await stream.step(torch.randn(1, 1, 64), pos, timeout=30)
                    times.append((t0, time.perf_counter()))
                await stream.close()
                return times
            finally:
                await p2p.shutdown()

        sent = asyncio.run(steps())
        events = trace.read_file(folder, peer.pid)  # flushed once each reply went out
        assert [name for name, _ in events] == STEP_STAGES * 3
        stamps = [t for _, t in events]
        assert stamps == sorted(stamps)
        # One clock for every process: each step's stages fall within the client's step.
        for (start, end), i in zip(sent, range(0, 15, 5), strict=True):
            assert start <= stamps[i] and stamps[i + 3] <= end
    finally:
        peer.kill()


def test_timeline_gives_each_hops_stages_and_costs():
    def hop(offset: float) -> list[tuple[str, float]]:  # stages of two steps, 1 s apart
        return [
            (name, step + offset + dt)
            for step in (10.0, 11.0)
            for name, dt in (
                ("request", 0.001),
                ("push_accepted", 0.002),
                ("input", 0.003),
                ("compute_start", 0.004),
                ("compute_end", 0.014),
                ("pushed", 0.015),
                ("replied", 0.016),
            )
        ]

    steps = [(10.0, 10.05), (11.0, 11.05)]
    out = timeline(steps, [hop(0.0), hop(0.015)])
    assert out["hop1_compute_start"] == 4.0 and out["hop2_push_accepted"] == 17.0
    assert out["hop1_compute_ms"] == out["hop2_compute_ms"] == 10.0
    assert out["hop1_input_to_compute_ms"] == 1.0
    assert out["hop1_compute_to_push_ms"] == 1.0 and out["hop1_push_transit_ms"] == 2.0
    assert out["client_reply"] == 50.0 and out["last_compute_to_client_ms"] == 21.0
    keys = list(out)
    assert keys.index("hop1_replied") < keys.index("hop2_request")  # hop by hop, in stage order
