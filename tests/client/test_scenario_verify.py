"""Scenarios of output verification with real peer processes: a liar on the route is caught.

One swarm for the module: a 0:3 (alone: unverifiable), b and c 3:6 honest, and a liar on 3:6
(tests/adversary_peer.py) whose mode each test writes to its mode file. The client is made to
route through the liar (its measured round trip looks best), so every lie reaches the route.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from petals_like.model import DistributedModelForCausalLM
from swarm.generation import generate_local
from tests.conftest import PeerProcess

pytestmark = pytest.mark.slow

PROMPT = [5, 17, 42, 8, 60, 11, 99, 23]
NEW = 16


@dataclass
class Swarm:
    boot: list[str]
    peers: dict[str, PeerProcess]
    mode_file: Path

    def liar_as_best(self, model: DistributedModelForCausalLM) -> None:
        """Make the client's route go through the liar: it looks nearest."""
        for name, p in self.peers.items():
            if name in ("b", "c"):
                model.router.rtts[p.peer_id] = 0.5
        model.router.rtts[self.peers["liar"].peer_id] = 0.001


@pytest.fixture(scope="module")
def swarm(swarm_factory, tmp_path_factory) -> Swarm:
    import sys

    mode_file = tmp_path_factory.mktemp("verify-scenarios") / "mode"
    mode_file.write_text("honest")
    liar = [sys.executable, "-m", "tests.adversary_peer", "--mode-file", str(mode_file)]
    spans = {"a": "0:3", "b": "3:6", "c": "3:6", "liar": "3:6"}
    s = swarm_factory(spans, prefix={"liar": liar})
    return Swarm(s.boot, s.peers, mode_file)


@pytest.fixture(scope="module")
def local_model(tiny_model_dir):
    from swarm.model.loading import load_model

    return load_model(str(tiny_model_dir), progress=False)


def _generate(swarm: Swarm, model_dir, mode: str, **kw):
    swarm.mode_file.write_text(mode)
    with DistributedModelForCausalLM.from_pretrained(str(model_dir), swarm.boot, **kw) as model:
        swarm.liar_as_best(model)
        streamed: list[int] = []
        sampled: list[int] = []  # every token as sampled, the liar's included
        out = model.generate(
            PROMPT,
            max_new_tokens=NEW,
            stop_on_eos=False,
            on_token=lambda t: streamed.append(int(t[0])),
            on_sampled=lambda t: sampled.append(int(t[0])),
        )
        stats = model.last_stats
    _generate.sampled = sampled
    return out[0, len(PROMPT) :].tolist(), streamed, stats


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["corrupt", "echo"])
def test_scenario_verify_liar_on_route_is_banned_and_text_is_honest(
    swarm, tiny_model_dir, local_model, mode
):
    want = generate_local(local_model, None, PROMPT, NEW, stop_on_eos=False)
    liar = swarm.peers["liar"].peer_id
    fooled, _, _ = _generate(swarm, tiny_model_dir, mode, compression="none", verify=0.0)
    assert fooled != want  # the attack works when nothing checks
    got, streamed, stats = _generate(swarm, tiny_model_dir, mode, compression="none", verify=0.2)
    assert got == want and streamed == want
    # on_sampled saw the liar's tokens too, then the regenerated ones; on_token only the checked.
    sampled = _generate.sampled
    assert len(sampled) == NEW + stats.regenerated and sampled[-NEW:] == want, sampled
    assert [x.peer_id for x in stats.liars] == [liar]
    assert stats.liars[0].on_route and stats.liars[0].blocks == (3, 6)
    # The prefill is the liar's first step: every later token is regenerated from it.
    assert stats.liars[0].position == 0
    assert next(h for h in stats.route if h.start == 3).peer_id != liar
    assert stats.unverifiable == [(0, 3)]  # a serves 0:3 alone: said, not failed


@pytest.mark.timeout(300)
def test_scenario_verify_liar_on_some_steps_is_caught_with_the_codec_on(swarm, tiny_model_dir):
    liar = swarm.peers["liar"].peer_id
    # The honest text with int8 on the wire (through the liar while it is honest).
    honest, _, clean = _generate(swarm, tiny_model_dir, "honest", verify=0.0)
    assert not clean.liars
    got, streamed, stats = _generate(swarm, tiny_model_dir, "corrupt20", verify=0.2)
    assert got == honest and streamed == honest
    assert [x.peer_id for x in stats.liars] == [liar]
    # It lies from its third step (prefill, token 1, token 2): position len(PROMPT) + 1.
    assert stats.liars[0].position == len(PROMPT) + 1
    print(
        f"corrupt20: liar caught at position {stats.liars[0].position} after "
        f"{stats.verify_checks} hop checks, {stats.regenerated} tokens regenerated"
    )


@pytest.mark.timeout(300)
def test_scenario_verify_lying_checker_is_banned(swarm, tiny_model_dir, local_model):
    want = generate_local(local_model, None, PROMPT, NEW, stop_on_eos=False)
    swarm.mode_file.write_text("corrupt")
    liar = swarm.peers["liar"].peer_id
    kw = {"compression": "none", "verify": 1.0}
    with DistributedModelForCausalLM.from_pretrained(str(tiny_model_dir), swarm.boot, **kw) as m:
        m.router.rtts[liar] = 0.5  # the route avoids it; it is picked to check (a coin flip)
        out = m.generate(PROMPT, max_new_tokens=NEW, stop_on_eos=False)
        stats = m.last_stats
    assert out[0, len(PROMPT) :].tolist() == want
    assert [(x.peer_id, x.on_route) for x in stats.liars] == [(liar, False)]
    assert stats.regenerated == 0


@pytest.mark.timeout(300)
def test_scenario_verify_speculative_decoding_with_a_liar_keeps_greedy_text(
    swarm, tiny_model_dir, local_model
):
    want = generate_local(local_model, None, PROMPT, NEW, stop_on_eos=False)
    swarm.mode_file.write_text("corrupt20")
    kw = {"compression": "none", "verify": 0.2}
    with DistributedModelForCausalLM.from_pretrained(str(tiny_model_dir), swarm.boot, **kw) as m:
        swarm.liar_as_best(m)
        out = m.generate(PROMPT, max_new_tokens=NEW, stop_on_eos=False, speculative="ngram")
        stats = m.last_stats
    assert out[0, len(PROMPT) :].tolist() == want
    assert [x.peer_id for x in stats.liars] == [swarm.peers["liar"].peer_id]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("tuning", ["lora", "deep_ptune"])
def test_scenario_verify_checks_agree_with_an_adapter(swarm, tiny_model_dir, tuning):
    swarm.mode_file.write_text("honest")
    kw = {"compression": "none", "verify": 1.0, "tuning": tuning}
    with DistributedModelForCausalLM.from_pretrained(str(tiny_model_dir), swarm.boot, **kw) as m:
        if tuning == "lora":  # LoRA starts as a no-op: make it change the outputs
            torch.manual_seed(0)
            with torch.no_grad():
                for p in m.parameters():
                    p.normal_(0, 0.5)
        m.generate(PROMPT, max_new_tokens=6, stop_on_eos=False)
        stats = m.last_stats
    # Six steps (the prompt, then five tokens: the last is not fed), each checked on 3:6 with the
    # adapter: a checker without it would disagree.
    assert stats.verify_checks == 6 and not stats.liars and not stats.unsettled
