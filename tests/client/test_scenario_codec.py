"""Scenarios with real peers on 127.0.0.1: the "auto" codec measures each hop's link.

On loopback it keeps fp32 (greedy text equals local); behind a slow emulated uplink it takes int8.
"""

from __future__ import annotations

import pytest

from petals_like.model import DistributedModelForCausalLM
from swarm.generation import generate_local
from tests.conftest import PeerProcess, wait_for

pytestmark = pytest.mark.slow

PROMPT = [5, 17, 42, 8, 60, 11, 99, 23]
NEW = 16


@pytest.fixture(scope="module")
def boot(tmp_path_factory, tiny_model_dir, throughput_cache):
    from swarm.dht import make_dht
    from swarm.model.loading import resolve_model
    from swarm.peer.dht_view import fetch_swarm

    logs = tmp_path_factory.mktemp("codec-scenarios")
    env = {"SWARM_MESH_CACHE": str(throughput_cache.parent)}
    base = ["join", "--model", str(tiny_model_dir), "--quant", "none", "--max-start-delay", "0"]
    peers: list[PeerProcess] = []
    dht = None
    try:
        peers.append(PeerProcess([*base, "--stage", "0:3"], env, logs / "a.log"))
        maddrs = peers[0].wait_maddrs(180)
        peers.append(
            PeerProcess([*base, "--stage", "3:6", "--initial-peers", *maddrs], env, logs / "b.log")
        )
        peers[1].wait_maddrs(180)
        dht = make_dht(initial_peers=maddrs, client_mode=True)
        prefix = resolve_model(str(tiny_model_dir)).name

        def online() -> int:
            try:
                return sum(r.state == "online" for r in fetch_swarm(dht, prefix, 6, 5.0))
            except Exception:  # not answering yet
                return 0

        wait_for(lambda: online() == 2, 240, 0.5, "two peers online")
        yield maddrs
    finally:
        if dht is not None:
            dht.shutdown()
        for p in peers:
            p.kill()


@pytest.mark.timeout(300)
def test_scenario_auto_codec_on_loopback_is_lossless_and_equals_local(boot, tiny_model_dir):
    from swarm.model.loading import load_model

    want = generate_local(
        load_model(str(tiny_model_dir), progress=False), None, PROMPT, NEW, stop_on_eos=False
    )
    with DistributedModelForCausalLM.from_pretrained(str(tiny_model_dir), boot) as model:
        assert model.router.config.compression == "auto"
        out = model.generate(PROMPT, max_new_tokens=NEW, stop_on_eos=False)
        choices = dict(model.router.codec_choices)
    assert out[0, len(PROMPT) :].tolist() == want
    assert len(choices) == 2 and {c.codec for c in choices.values()} == {"none"}, choices
    assert all(c.link is not None and c.lossless_share < 0.1 for c in choices.values())


@pytest.mark.timeout(300)
def test_scenario_auto_codec_behind_a_slow_uplink_takes_int8(boot, tiny_model_dir):
    # 0.25 Mbit/s: fp32 of one token (256 bytes) costs 8 ms, int8 2 ms and ~0.2 ms of CPU.
    with DistributedModelForCausalLM.from_pretrained(
        str(tiny_model_dir), boot, link_bandwidth=0.25
    ) as model:
        out = model.generate(PROMPT, max_new_tokens=4, stop_on_eos=False)
        choices = dict(model.router.codec_choices)
    assert out.shape[1] == len(PROMPT) + 4
    assert len(choices) == 2 and {c.codec for c in choices.values()} == {"int8-block64"}, choices
    # Measured (about 0.25 Mbit/s), or too slow to probe within half the open's bound.
    assert all(c.link is None or c.link.mbit_per_s < 1 for c in choices.values())
