"""Scenario with a real peer process serving nf4 blocks: greedy text through the swarm equals
local nf4 text, and the peer announces its quantization. Tests --quant nf4 end to end.
"""

from __future__ import annotations

import pytest
import torch

from petals_like.model import DistributedModelForCausalLM
from swarm.generation import generate_local
from swarm.model.loading import load_model
from tests.conftest import PeerProcess

pytestmark = pytest.mark.slow

PROMPT = [5, 17, 42, 8, 60, 11]
NEW = 8


@pytest.mark.timeout(300)
def test_scenario_nf4_peer_generates_what_local_nf4_does(tiny_model_dir, tmp_path, monkeypatch):
    # A cache of its own: the session's may already hold these codes, and then nothing calibrates.
    env = {"SWARM_MESH_CACHE": str(tmp_path / "peer-cache")}
    args = ["join", "--model", str(tiny_model_dir), "--stage", "0:6", "--quant", "nf4"]
    peer = PeerProcess([*args, "--max-start-delay", "0"], env, tmp_path / "nf4.log")
    try:
        maddrs = peer.wait_maddrs(90)
        peer.wait_log("serving blocks", 120)
        # Calibrated here on its own (a cache the peer did not fill): the codes must agree.
        monkeypatch.setenv("SWARM_MESH_CACHE", str(tmp_path / "local-cache"))
        local = load_model(str(tiny_model_dir), quant="nf4", progress=False)
        fp32 = load_model(str(tiny_model_dir), progress=False)
        want = generate_local(local, None, PROMPT, NEW, stop_on_eos=False)
        with DistributedModelForCausalLM.from_pretrained(
            str(tiny_model_dir), maddrs, compression="none"
        ) as model:
            out = model.generate(PROMPT, max_new_tokens=NEW, stop_on_eos=False)
            route = model.last_stats.route
        assert out[0, len(PROMPT) :].tolist() == want, peer.log_tail()
        assert [(h.start, h.end) for h in route] == [(0, 6)]
        # nf4 weights really were used: the fp32 model's logits differ
        ids = torch.tensor([PROMPT])
        with torch.inference_mode():
            assert not torch.allclose(local(ids), fp32(ids), atol=1e-4)
        assert "(nf4)" in peer.log_tail(200)  # loading logs the mode
        assert "calibrated nf4 blocks 0,1,2,3,4,5" in peer.log_tail(200)
    finally:
        peer.kill()
