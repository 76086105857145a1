"""Fair sharing: per-client limits, clients taking turns on the compute thread, and work whose
caller has gone never running. Tests swarm/peer/fairness.py, swarm/peer/worker.py and their use
in swarm/peer/handler.py, in process and against a real peer process with two P2P identities.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import statistics
import threading

import pytest
import torch
from hivemind.p2p import P2P

from swarm.errors import CacheFull
from swarm.peer.client import PeerClient
from swarm.peer.fairness import ClientLedger
from swarm.peer.memory import PeerBusy
from swarm.peer.worker import ComputeWorker
from tests.conftest import PeerProcess

HIDDEN = 64  # the tiny model's
CLIENT_SESSIONS = 64  # the peer lets one client hold this many: enough to load it
# a's steps keep the compute thread busy (a worker that always ran steps first starved b: 8 to
# 13 s against 0.25 to 0.5 s unloaded), a batch of 32 of them costs about half of b's forward,
# which is mostly compute, not RPC overhead.
STEP_BATCH, STEP_TOKENS = 4, 8
FORWARD_TOKENS = 2048
LOAD_SECONDS = 3.0


# ---- in process ---------------------------------------------------------------------------


def test_ledger_limits_name_their_flag_and_leave_a_share_for_others():
    ledger = ClientLedger(max_sessions=2, max_cache_tokens=25, max_requests=1)
    ledger.open_session("a", 20, left_after=80)
    ledger.open_session("a", 50, left_after=30)  # past its share: 30 stay free for others
    with pytest.raises(CacheFull, match="--client-sessions 2"):
        ledger.open_session("a", 1, left_after=29)
    ledger.close_session("a", 50)
    with pytest.raises(CacheFull, match="--client-cache-share"):
        ledger.open_session("a", 20, left_after=10)  # would leave less than a share free
    ledger.open_session("b", 20, left_after=10)  # within its own share: always allowed
    with ledger.request("a"):
        with pytest.raises(PeerBusy, match="--client-requests 1"):
            with ledger.request("a"):
                pass
        with ledger.request("b"):
            pass
    ledger.close_session("a", 20)
    ledger.close_session("b", 20)
    assert len(ledger) == 0  # idle clients are forgotten


async def test_worker_lets_clients_take_turns():
    worker = ComputeWorker()
    gate = threading.Event()
    ran: list[str] = []
    try:
        busy = asyncio.ensure_future(worker.call(lambda: gate.wait(30), "a"))
        await asyncio.sleep(0.05)  # running: the rest queue behind it
        calls = [worker.call(lambda i=i: ran.append(f"a{i}"), "a") for i in range(3)]
        tasks = [asyncio.ensure_future(c) for c in calls]
        await asyncio.sleep(0.01)
        tasks.append(asyncio.ensure_future(worker.call(lambda: ran.append("b0"), "b")))
        await asyncio.sleep(0.05)
        gate.set()
        await asyncio.gather(busy, *tasks)
        assert ran == ["a0", "b0", "a1", "a2"]  # b waits for one of a's calls, not all three
    finally:
        gate.set()
        worker.stop()


# ---- a real peer --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fair_peer(tiny_model_dir, tmp_path_factory, throughput_cache):
    """Blocks 0:3, fp32, 16384 cache tokens (a share of 4096 per client), 64 sessions a client."""
    logs = tmp_path_factory.mktemp("fairness_logs")
    env = {"SWARM_MESH_CACHE": str(throughput_cache.parent)}
    args = ["join", "--model", str(tiny_model_dir), "--stage", "0:3", "--quant", "none"]
    args += ["--cache-tokens", "16384", "--client-sessions", str(CLIENT_SESSIONS)]
    args += ["--max-request-tokens", "4096", "--announce-period", "2", "--session-timeout", "30"]
    peer = PeerProcess(args, env, logs / "peer.log")
    try:
        peer.wait_maddrs(90)
        peer.wait_log("serving blocks", 120)
        yield peer
    finally:
        peer.kill()


def _one_client(peer: PeerProcess, fn):
    """Run `fn(client)` with a PeerClient of a fresh P2P identity (loopback only)."""

    async def main():
        p2p = await P2P.create(initial_peers=peer.maddrs, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        try:
            return await fn(PeerClient(p2p))
        finally:
            await p2p.shutdown()

    return asyncio.run(main())


async def _forward_times(client: PeerClient, peer: str, n: int, tokens: int) -> list[float]:
    loop = asyncio.get_running_loop()
    x = torch.randn(1, tokens, HIDDEN)
    times = []
    for _ in range(n):
        t0 = loop.time()
        await client.forward(peer, x, 0, 3, timeout=60)
        times.append(loop.time() - t0)
    return times


class _Crowd(threading.Thread):
    """Client a on its own thread, loop and P2P identity (its client-side work stays out of b's
    loop): opens up to 600 sessions, then on `go` steps all it got until `stop`."""

    def __init__(self, peer: PeerProcess):
        super().__init__(daemon=True)
        self.peer = peer
        self.opened, self.go, self.stop = threading.Event(), threading.Event(), threading.Event()
        self.sessions, self.refusal, self.steps, self.error = 0, None, 0, None

    def run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as e:  # reported by the test
            self.error = e
        finally:
            self.opened.set()

    async def _main(self) -> None:
        p2p = await P2P.create(initial_peers=self.peer.maddrs, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        client, peer, sessions = PeerClient(p2p), self.peer.peer_id, []
        try:
            for _ in range(600):
                try:
                    s = await client.open_inference(
                        peer, 0, 3, max_length=16, batch_size=STEP_BATCH, timeout=30
                    )
                except CacheFull as e:
                    self.refusal = e
                    break
                sessions.append(s)
            self.sessions = len(sessions)
            self.opened.set()
            await asyncio.to_thread(self.go.wait, 60)
            await asyncio.gather(*(self._stepping(s) for s in sessions))
        finally:
            for s in sessions:
                with contextlib.suppress(Exception):
                    await s.close()
            await p2p.shutdown()

    async def _stepping(self, session) -> None:
        x = torch.randn(STEP_BATCH, STEP_TOKENS, HIDDEN)
        while not self.stop.is_set():
            await session.step(x, 0)  # replays positions 0..: the cache never fills
            self.steps += 1


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_scenario_a_crowding_client_leaves_room_and_time_for_another(fair_peer):
    peer = fair_peer.peer_id
    crowd = _Crowd(fair_peer)
    crowd.start()

    async def go(b: PeerClient):
        await asyncio.to_thread(crowd.opened.wait, 120)
        assert crowd.error is None, crowd.error
        assert crowd.sessions == CLIENT_SESSIONS and "--client-sessions" in str(crowd.refusal)
        other = await b.open_inference(peer, 0, 3, max_length=16, timeout=30)
        await other.step(torch.randn(1, 1, HIDDEN), 0)
        await other.close()

        await _forward_times(b, peer, 2, FORWARD_TOKENS)  # warm
        unloaded = await _forward_times(b, peer, 10, FORWARD_TOKENS)
        crowd.go.set()
        await asyncio.sleep(0.5)  # every session is stepping
        loop = asyncio.get_running_loop()
        t0, before = loop.time(), crowd.steps
        loaded = []
        while loop.time() - t0 < LOAD_SECONDS:
            loaded += await _forward_times(b, peer, 1, FORWARD_TOKENS)
        rate = (crowd.steps - before) / (loop.time() - t0)
        return unloaded, loaded, rate

    try:
        unloaded, loaded, rate = _one_client(fair_peer, go)
    finally:
        crowd.go.set()
        crowd.stop.set()
        crowd.join(60)
    assert crowd.error is None, crowd.error
    u, lo = statistics.median(unloaded), statistics.median(loaded)
    print(
        f"\nclient b's forward ({FORWARD_TOKENS} tokens): unloaded median {u * 1e3:.0f} ms, under "
        f"{CLIENT_SESSIONS} sessions of client a stepping {lo * 1e3:.0f} ms ({lo / u:.1f}x, "
        f"{len(loaded)} forwards); a ran {rate:.0f} steps/s of {STEP_BATCH}x{STEP_TOKENS} tokens"
    )
    assert rate > 20, "the load did not load the peer"
    assert lo < 3 * u


LONGS = 5  # long forwards sent at once in the given-up-work test


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_scenario_work_of_callers_gone_never_runs(fair_peer):
    peer = fair_peer.peer_id

    async def go(a: PeerClient):
        long = torch.randn(1, 4096, HIDDEN)
        loop = asyncio.get_running_loop()
        await a.forward(peer, long, 0, 3, timeout=60)  # warm
        t0 = loop.time()
        await a.forward(peer, long, 0, 3, timeout=60)
        t_long = loop.time() - t0
        # Five long ones at once; once the first is back, the others' requests have arrived
        # (sent beside it) and the worker computes them in turn, four long forwards' work
        # (at least three once a small one arrives). Small forwards sent now queue behind it and
        # are given up after one long forward's time: arrived, and still queued, however the
        # transfer and the load share that time. (Three long ones and a quarter of one's time
        # left too little room on a loaded machine: the small ones were given up unsent, or
        # reached a worker that was already free.)
        longs = [asyncio.create_task(a.forward(peer, long, 0, 3, timeout=60)) for _ in range(LONGS)]
        await asyncio.wait(longs, return_when=asyncio.FIRST_COMPLETED)
        t0 = loop.time()
        small = torch.randn(1, 2, HIDDEN)
        gone = [
            asyncio.create_task(asyncio.wait_for(a.forward(peer, small, 0, 3), t_long))
            for _ in range(4)
        ]  # queued behind the long ones, then given up by their caller
        await asyncio.gather(*gone, return_exceptions=True)
        await asyncio.gather(*longs)
        await a.forward(peer, torch.randn(1, 2, HIDDEN), 0, 3, timeout=60)
        return t_long, loop.time() - t0

    dropped_before = _dropped(fair_peer)
    t_long, t_all = _one_client(fair_peer, go)
    dropped = _dropped(fair_peer) - dropped_before
    print(
        f"\na long forward {t_long:.2f} s; after the first of {LONGS}, 4 given up, the others "
        f"and a short one: {t_all:.2f} s; "
        f"the peer dropped {dropped} queued tasks"
    )
    # Each was dropped from the queue, or (on a slow machine) given up before it got there.
    assert 1 <= dropped <= 4, "no given-up forward was dropped from the queue"
    assert t_all < (LONGS + 1) * t_long, "the given-up forwards ran"  # 4 long ones were left


def _dropped(peer: PeerProcess) -> int:
    """Queued tasks the peer's worker dropped so far, from its log lines."""
    found = re.findall(r"dropped (\d+) queued task", peer.log_path.read_text(errors="replace"))
    return sum(int(n) for n in found)
