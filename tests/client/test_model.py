"""Tests of petals_like.model: generate() over an in-process fake swarm against generate_local."""

import pytest
import torch

from petals_like.model import with_compression
from petals_like.router import RouterConfig
from swarm.errors import BadRequest, NoRoute
from swarm.generation import SamplingConfig, generate_local

PROMPT = [5, 17, 42, 8, 60, 11]


@pytest.fixture
def three_peers(fake_swarm):
    fake_swarm.add("a", 0, 2)
    fake_swarm.add("b", 2, 4)
    fake_swarm.add("c", 4, 6)
    return fake_swarm


@pytest.mark.timeout(60)
def test_greedy_equals_local(three_peers, tiny_model):
    want = generate_local(tiny_model, None, PROMPT, 12, stop_on_eos=False)
    with three_peers.distributed_model() as model:
        out = model.generate(torch.tensor([PROMPT]), max_new_tokens=12, stop_on_eos=False)
        assert out[0, : len(PROMPT)].tolist() == PROMPT
        assert out[0, len(PROMPT) :].tolist() == want
        stats = model.last_stats
        assert stats.new_tokens == 12 and [h.peer_id for h in stats.route] == ["a", "b", "c"]


@pytest.mark.timeout(60)
def test_seeded_sampling_is_reproducible_and_equals_local(three_peers, tiny_model):
    kw = dict(temperature=0.9, top_k=20, top_p=0.9, repetition_penalty=1.2, seed=7)
    want = generate_local(tiny_model, None, PROMPT, 10, SamplingConfig(**kw), stop_on_eos=False)
    with three_peers.distributed_model() as model:
        a = model.generate(PROMPT, max_new_tokens=10, stop_on_eos=False, **kw)
        b = model.generate(PROMPT, max_new_tokens=10, stop_on_eos=False, **kw)
    assert a.tolist() == b.tolist()
    assert a[0, len(PROMPT) :].tolist() == want


@pytest.mark.timeout(60)
def test_failover_mid_generation_gives_the_same_tokens(three_peers, tiny_model):
    three_peers.add("b2", 2, 4, rps=1.0)
    three_peers.peers["b"].die_after = 5
    want = generate_local(tiny_model, None, PROMPT, 12, stop_on_eos=False)
    with three_peers.distributed_model() as model:
        out = model.generate(PROMPT, max_new_tokens=12, stop_on_eos=False)
        stats = model.last_stats
    assert out[0, len(PROMPT) :].tolist() == want
    assert len(stats.failovers) == 1 and stats.failovers[0].peer_id == "b"
    assert [h.peer_id for h in stats.route] == ["a", "b2", "c"]


@pytest.mark.timeout(60)
def test_chat_session_keeps_caches_across_generate_calls(three_peers, tiny_model):
    turn2 = [30, 31, 32]
    first = generate_local(tiny_model, None, PROMPT, 5, stop_on_eos=False)
    # Locally, the second turn sees the whole conversation: prompt, first answer, new turn.
    second = generate_local(tiny_model, None, PROMPT + first + turn2, 4, stop_on_eos=False)
    with three_peers.distributed_model() as model:
        with model.inference_session(max_length=64) as session:
            a = model.generate(PROMPT, max_new_tokens=5, stop_on_eos=False)
            opened = {p: three_peers.peers[p].opened for p in "abc"}
            b = model.generate(turn2, max_new_tokens=4, stop_on_eos=False)
            assert session.position == len(PROMPT) + 5 + len(turn2) + 3
        # The second call reused the peers' sessions instead of opening new ones.
        assert {p: three_peers.peers[p].opened for p in "abc"} == opened
    assert a[0, len(PROMPT) :].tolist() == first
    assert b[0, len(turn2) :].tolist() == second


@pytest.mark.timeout(60)
def test_stops_at_end_of_sequence(three_peers, tiny_model):
    free = generate_local(tiny_model, None, PROMPT, 8, stop_on_eos=False)
    eos = free[3]
    tiny_model.config.eos_token_id = [eos]
    with three_peers.distributed_model() as model:
        out = model.generate(PROMPT, max_new_tokens=8)
    new = out[0, len(PROMPT) :].tolist()
    assert new == free[: free.index(eos) + 1]


@pytest.mark.timeout(60)
def test_batch_rows_match_single_rows(three_peers, tiny_model):
    rows = [PROMPT, [9, 9, 2, 71, 4, 50]]
    want = [generate_local(tiny_model, None, r, 6, stop_on_eos=False) for r in rows]
    with three_peers.distributed_model() as model:
        out = model.generate(torch.tensor(rows), max_new_tokens=6, stop_on_eos=False)
    for i, w in enumerate(want):
        assert out[i, len(PROMPT) :].tolist() == w


@pytest.mark.timeout(60)
def test_no_peer_for_some_blocks_is_a_clear_error(fake_swarm):
    fake_swarm.add("a", 0, 2)
    fake_swarm.add("c", 4, 6)
    with fake_swarm.distributed_model() as model:
        with pytest.raises(NoRoute, match="2:4"):
            model.generate(PROMPT, max_new_tokens=3)


@pytest.mark.timeout(60)
def test_bad_arguments_are_bad_requests(three_peers):
    with three_peers.distributed_model() as model:
        with pytest.raises(BadRequest):
            model.generate([], max_new_tokens=3)
        with pytest.raises(BadRequest):
            model.generate([1000], max_new_tokens=3)
        with pytest.raises(BadRequest):
            model.generate(PROMPT, max_new_tokens=3, temperature=-1)
        with model.inference_session(max_length=8):
            with pytest.raises(BadRequest, match="room"):
                model.generate(PROMPT, max_new_tokens=5)


def test_compression_fills_the_router_config_without_overriding_it():
    assert with_compression(None, None).compression == "auto"
    assert with_compression(None, "none").compression == "none"
    chosen = RouterConfig(compression="int8-row", ping_timeout=1.0)
    assert with_compression(chosen, None) is chosen
    assert with_compression(chosen, "int8-row") is chosen
    filled = with_compression(RouterConfig(ping_timeout=1.0), "none")
    assert filled == RouterConfig(ping_timeout=1.0, compression="none")
    with pytest.raises(BadRequest, match="give the codec once"):
        with_compression(chosen, "none")
