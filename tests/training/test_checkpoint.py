"""Checkpoint folders written from trained parts load back through the mesh's own loader.

Covers the Hugging Face config round trip and the tensor names of spans and client parts.
"""

import torch

from swarm.model import ModelConfig
from swarm.model.loading import load_config, load_model
from swarm.training.checkpoint import client_tensors, hf_config, span_tensors, write_folder


def test_hf_config_round_trip(tiny_model_dir):
    config = load_config(str(tiny_model_dir))
    again = ModelConfig.from_hf(hf_config(config), name=config.name)
    assert again == config


def test_folder_from_parts_loads_back(tiny_model_dir, tmp_path):
    model = load_model(str(tiny_model_dir), progress=False)
    with torch.no_grad():
        model.span.blocks[0].mlp.up_proj.weight.add_(0.5)  # "trained"
    tensors = client_tensors(model.client)
    tensors.update(span_tensors(model.span))
    out = write_folder(tmp_path / "trained", model.config, tensors, source_folder=None)
    again = load_model(str(out), progress=False)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        assert (again(ids) - model(ids)).abs().max() < 1e-5
