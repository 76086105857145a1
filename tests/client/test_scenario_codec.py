"""Scenarios with real peers on 127.0.0.1: the "auto" codec measures each hop's link.

On loopback it keeps fp32 (greedy text equals local); behind a slow emulated uplink it takes int8.
"""

from __future__ import annotations

import pytest

from petals_like.model import DistributedModelForCausalLM
from swarm.generation import generate_local

pytestmark = pytest.mark.slow

PROMPT = [5, 17, 42, 8, 60, 11, 99, 23]
NEW = 16


@pytest.fixture(scope="module")
def boot(swarm_factory) -> list[str]:
    return swarm_factory({"a": "0:3", "b": "3:6"}).boot


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
