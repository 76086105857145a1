"""Scenarios with real peer processes on 127.0.0.1: equality with local generation, int8 agreement,
two clients at once, SIGKILL mid-generation (the failover path), and blocks nobody serves.

The tests share one swarm (module scope) and run in file order: the last two kill its peers.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

from swarm.errors import NoRoute
from swarm.generation import generate_local
from tests.conftest import PeerProcess, Swarm, connect, wait_for

pytestmark = pytest.mark.slow

PROMPT = [5, 17, 42, 8, 60, 11, 99, 23]
NEW = 24


@pytest.fixture(scope="module")
def swarm(swarm_factory) -> Swarm:
    # fp32 peers: the scenarios compare their text with the local fp32 model's
    return swarm_factory({"a": "0:3", "b": "3:6", "c": "3:6"})


@pytest.fixture(scope="module")
def local_model(tiny_model_dir):
    from swarm.model.loading import load_model

    return load_model(str(tiny_model_dir), progress=False)


@pytest.mark.timeout(400)
def test_scenario_greedy_through_the_swarm_equals_local(swarm, tiny_model_dir, local_model):
    want = generate_local(local_model, None, PROMPT, NEW, stop_on_eos=False)
    with connect(swarm, tiny_model_dir, compression="none") as model:
        out = model.generate(PROMPT, max_new_tokens=NEW, stop_on_eos=False)
        stats = model.last_stats
    assert out[0, len(PROMPT) :].tolist() == want
    assert [(h.start, h.end) for h in stats.route] == [(0, 3), (3, 6)]
    assert not stats.failovers


@pytest.mark.timeout(300)
def test_scenario_speculative_greedy_through_the_swarm_equals_local(
    swarm, tiny_model_dir, local_model
):
    from swarm.speculative import ModelDrafter

    want = generate_local(local_model, None, PROMPT, NEW, stop_on_eos=False)
    with connect(swarm, tiny_model_dir, compression="none") as model:
        for spec in ("ngram", ModelDrafter(local_model, len(PROMPT) + NEW)):
            out = model.generate(PROMPT, max_new_tokens=NEW, stop_on_eos=False, speculative=spec)
            assert out[0, len(PROMPT) :].tolist() == want
        # The draft model is the target itself: every draft is taken, few round trips are made.
        st = model.last_stats.speculative
    assert st.tokens == NEW and st.accepted == st.drafted and st.rounds <= NEW // 3, st


@pytest.mark.timeout(300)
def test_scenario_int8_activations_stay_close(swarm, tiny_model_dir, local_model):
    want = generate_local(local_model, None, PROMPT, NEW, stop_on_eos=False)
    with connect(swarm, tiny_model_dir, compression="int8-block64") as model:
        out = model.generate(PROMPT, max_new_tokens=NEW, stop_on_eos=False)
        # Hidden states after every block, through the swarm with int8 on the wire vs locally.
        x = local_model.client.embed(torch.tensor([PROMPT]))
        with model.inference_session(max_length=len(PROMPT)) as session:
            remote = session.step(x)
    with torch.inference_mode():
        local = local_model.span(x)
    rel = float((remote - local).norm() / local.norm())
    got = out[0, len(PROMPT) :].tolist()
    agree = next((i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b), NEW)
    print(f"int8 activations: relative L2 error {rel:.4f}, first {agree}/{NEW} tokens agree")
    assert rel < 0.05
    assert agree >= 1


@pytest.mark.timeout(400)
def test_scenario_two_clients_at_once_both_correct(swarm, tiny_model_dir, local_model):
    prompts = [PROMPT, [7, 7, 30, 2, 91, 64]]
    want = [generate_local(local_model, None, p, NEW, stop_on_eos=False) for p in prompts]
    models = [connect(swarm, tiny_model_dir, compression="none") for _ in prompts]
    results: list = [None, None]
    started = threading.Barrier(2)

    def run(i: int) -> None:
        started.wait(30)
        try:
            results[i] = models[i].generate(prompts[i], max_new_tokens=NEW, stop_on_eos=False)
        except Exception as e:  # reported by the assertion below
            results[i] = e

    try:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
    finally:
        for m in models:
            m.close()
    for i, p in enumerate(prompts):
        assert not isinstance(results[i], Exception), results[i]
        assert results[i][0, len(p) :].tolist() == want[i]


@pytest.mark.timeout(400)
def test_scenario_sigkill_mid_generation_gives_the_same_tokens(swarm, tiny_model_dir, local_model):
    want = generate_local(local_model, None, PROMPT, NEW, stop_on_eos=False)
    killed: list[float] = []
    victim: list[PeerProcess] = []
    # Verification at its default: on_sampled counts steps (on_token waits for the checks).
    with connect(swarm, tiny_model_dir, compression="none") as model:
        with model.inference_session(max_length=len(PROMPT) + NEW) as session:

            def on_sampled(_token) -> None:
                on_sampled.count = getattr(on_sampled, "count", 0) + 1
                if on_sampled.count == 8:
                    hop = next(h for h in session.route if h.start == 3)
                    victim.append(swarm.by_peer_id(hop.peer_id))
                    # The process only, as a crash: its DHT child and p2pd live on.
                    os.kill(victim[0].pid, signal.SIGKILL)
                    killed.append(time.monotonic())

            out = model.generate(
                PROMPT, max_new_tokens=NEW, stop_on_eos=False, on_sampled=on_sampled
            )
        stats = model.last_stats
    assert killed, "the peer was not killed"
    assert out[0, len(PROMPT) :].tolist() == want
    assert len(stats.failovers) == 1
    f = stats.failovers[0]
    assert f.blocks == (3, 6) and f.peer_id == victim[0].peer_id
    assert next(h for h in stats.route if h.start == 3).peer_id != victim[0].peer_id
    # The token after the kill: how long the failure made us wait, against a usual step.
    gap = stats.token_times[8] - killed[0]
    steps = sorted(
        b - a for a, b in zip(stats.token_times[1:8], stats.token_times[2:9], strict=True)
    )
    print(
        f"failover: {f.summary()}; next token {gap * 1000:.0f} ms after the kill "
        f"(median step {steps[len(steps) // 2] * 1000:.0f} ms)"
    )
    assert gap < 5.0  # the goal is < 1 s; this shared 2-core machine can stall for seconds
    # Its DHT process and p2pd do not outlive it: its watchdog ends them (issue 19).
    assert len(victim[0].noted_children) >= 2, "its DHT process and p2pd were not noted"
    wait_for(lambda: not victim[0].children_alive(), 15, 0.2, "the killed peer's children to exit")


@pytest.mark.timeout(300)
def test_scenario_blocks_served_by_nobody_is_a_clear_error(swarm, tiny_model_dir):
    # Kill whoever still serves 3:6; their DHT records stay "online" until they expire.
    for name in ("b", "c"):
        p = swarm.peers[name]
        if p.proc.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
    with connect(swarm, tiny_model_dir, compression="none") as model:
        t0 = time.monotonic()
        with pytest.raises(NoRoute, match="3:6"):
            model.generate(PROMPT, max_new_tokens=4)
        elapsed = time.monotonic() - t0
    print(f"no route: error after {elapsed:.2f} s")
    assert elapsed < 10.0
