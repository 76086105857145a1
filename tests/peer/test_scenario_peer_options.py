"""Scenarios with real peer processes for peer options: --quant int8, --identity, session timeout.

Tests swarm/peer/server.py, swarm/peer/handler.py and swarm/cli/peer.py beyond the defaults.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable

import pytest
import torch

from swarm.dht import make_dht
from swarm.errors import SessionExpired
from swarm.model.loading import load_span
from swarm.peer.client import PeerClient
from tests.conftest import PeerProcess

SESSION_TIMEOUT = 4.0
CACHE_TOKENS = 256

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def int8_peer(tiny_model_dir, tmp_path_factory, throughput_cache):
    """One peer serving blocks 0:3 with int8 weights and a short session timeout."""
    logs = tmp_path_factory.mktemp("options_logs")
    env = {"SWARM_MESH_CACHE": str(throughput_cache.parent)}
    args = [
        "join",
        "--model",
        str(tiny_model_dir),
        "--stage",
        "0:3",
        "--quant",
        "int8",
        "--cache-tokens",
        str(CACHE_TOKENS),
        "--session-timeout",
        str(SESSION_TIMEOUT),
        "--announce-period",
        "2",
        "--torch-threads",
        "1",
    ]
    peer = PeerProcess(args, env, logs / "int8.log")
    try:
        peer.wait_maddrs(90)
        peer.wait_log("serving blocks", 120)  # handlers are registered before this line
        yield peer
    finally:
        peer.kill()


def _with_client(maddrs: list[str], fn: Callable[[PeerClient], Awaitable]):
    """Run `fn(client)` in a fresh event loop with a client-mode DHT joined through `maddrs`."""
    dht = make_dht(initial_peers=maddrs, client_mode=True, start=True)

    async def main():
        return await fn(PeerClient(await dht.replicate_p2p()))

    try:
        return asyncio.run(main())
    finally:
        dht.shutdown()


def test_torch_threads_sets_the_peers_compute_threads(int8_peer, throughput_cache):
    """The peer measured its throughput with one thread: the cache key names the count."""
    keys = json.loads(throughput_cache.read_text())
    assert any("|1t|" in k and k.endswith("|int8|torch.float32") for k in keys), list(keys)


@pytest.mark.timeout(300)
def test_int8_peer_forward_equals_local_int8_span(int8_peer, tiny_model_dir):
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0))

    async def go(client: PeerClient):
        info = await client.info(int8_peer.peer_id, timeout=30)
        assert (info.quant, info.start, info.end) == ("int8", 0, 3)
        return await client.forward(int8_peer.peer_id, x, 0, 3, timeout=60)

    out = _with_client(int8_peer.maddrs, go)
    with torch.inference_mode():
        ref = load_span(tiny_model_dir, 0, 3, quant="int8", progress=False)(x)
        full = load_span(tiny_model_dir, 0, 3, progress=False)(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(out, full, atol=1e-6, rtol=0)  # int8 weights really were used
    assert ((out - full).norm() / full.norm()).item() < 0.05


@pytest.mark.timeout(300)
def test_idle_session_is_freed_then_expired(int8_peer):
    peer = int8_peer.peer_id

    async def go(client: PeerClient):
        loop = asyncio.get_running_loop()
        session = await client.open_inference(peer, 0, 3, max_length=100, timeout=30)
        await session.step(torch.randn(1, 2, 64), 0, timeout=60)
        idle_since = loop.time()
        assert (await client.info(peer, timeout=30)).cache_tokens_left == CACHE_TOKENS - 100
        left = 0
        while loop.time() - idle_since < SESSION_TIMEOUT + 30:  # bounded poll
            left = (await client.info(peer, timeout=30)).cache_tokens_left
            if left == CACHE_TOKENS:
                break
            await asyncio.sleep(0.2)
        freed_after = loop.time() - idle_since
        assert left == CACHE_TOKENS, "the idle session's cache never returned to the budget"
        assert freed_after > SESSION_TIMEOUT - 1.0, f"freed after {freed_after:.1f} s, too soon"
        with pytest.raises(SessionExpired):
            await session.step(torch.randn(1, 1, 64), 2, timeout=30)
        assert session.closed

    _with_client(int8_peer.maddrs, go)


@pytest.mark.timeout(300)
def test_identity_keeps_peer_id_across_restart(tiny_model_dir, peer_factory, tmp_path):
    key = tmp_path / "peer.key"
    args = ["join", "--model", str(tiny_model_dir), "--stage", "0:6", "--identity", str(key)]
    args += ["--shutdown-grace", "1"]
    first = peer_factory(*args)
    peer_id = first.peer_id
    assert key.exists(), "--identity must create the key file when it is missing"
    first.wait_log("serving blocks", 120)
    assert first.terminate(30) == 0  # SIGTERM: a clean exit
    second = peer_factory(*args)
    assert second.peer_id == peer_id
    other = peer_factory("join", "--model", str(tiny_model_dir), "--stage", "0:6")
    assert other.peer_id != peer_id  # without the key file, a fresh identity


def _single_cpu_threads(pid: int) -> list[list[int]]:
    """The allowed CPUs of each thread of process `pid` that may run on one CPU only."""
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        cpus = sorted(os.sched_getaffinity(int(tid)))
        if len(cpus) == 1:
            out.append(cpus)
    return sorted(out)


@pytest.mark.timeout(300)
def test_scenario_a_serving_peer_pins_its_compute_threads_one_per_cpu_unless_told_not_to(
    tiny_model_dir, peer_factory
):
    cpus = sorted(os.sched_getaffinity(0))
    threads = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    if len(cpus) < 2 or int(threads.stdout) != len(cpus):
        pytest.skip("a peer's default team does not span this machine's CPUs")
    args = ["join", "--model", str(tiny_model_dir), "--stage", "0:6"]
    pinned = peer_factory(*args)
    free = peer_factory(*args, "--pin-threads", "off", "--initial-peers", *pinned.wait_maddrs())
    for peer in (pinned, free):
        peer.wait_log("serving blocks", 120)
    pinned.wait_log("compute threads pinned to CPUs", 10)
    assert _single_cpu_threads(pinned.pid) == [[c] for c in cpus]  # its team, nothing else
    assert _single_cpu_threads(free.pid) == []
