"""simulations/skeleton.py: a compute-free stand-in keeps the model's tokenizer and block count
and loads like any checkpoint folder (the benchmarks take it for --model)."""

from __future__ import annotations

import pytest
import torch

from simulations.skeleton import write_skeleton
from swarm.model.loading import load_config, load_model, load_tokenizer


@pytest.mark.timeout(120)
def test_a_skeleton_has_the_models_tokenizer_and_blocks_at_a_tiny_width(tmp_path):
    folder = write_skeleton(tmp_path / "skel", "smollm2-135m")
    source, config = load_config("smollm2-135m"), load_config(str(folder))
    assert config.num_layers == source.num_layers == 30
    assert config.vocab_size == source.vocab_size
    assert config.eos_token_id == source.eos_token_id
    assert config.hidden_size == 64 < source.hidden_size
    text = "The capital of France is Paris."
    assert load_tokenizer(str(folder)).encode(text) == load_tokenizer("smollm2-135m").encode(text)
    model = load_model(str(folder), progress=False)
    ids = torch.tensor([load_tokenizer(str(folder)).encode(text)])
    with torch.inference_mode():
        logits = model(ids)
    assert logits.shape == (1, ids.shape[1], source.vocab_size)
    assert torch.isfinite(logits).all()
