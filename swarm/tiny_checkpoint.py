"""A random tiny Llama written as a Hugging Face folder (config.json + model.safetensors).

Used by the tests' `tiny_model_dir` fixture and the real-process churn harness (simulations/).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from swarm.model import LlamaModel, ModelConfig

# 6 blocks of hidden size 64 and no tokenizer: loads and runs in milliseconds on a CPU.
TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float32",
}


def write_tiny_checkpoint(
    folder: Path, config: Mapping | None = None, seed: int = 0, std: float | None = 0.08
) -> Path:
    """Write a random Llama to `folder` (created if missing) as HF names it; returns `folder`.

    config: a Hugging Face config.json as a dict (default TINY_CONFIG), written as it is.
    seed: torch's seed for the weights, so that a folder is the same on every run.
    std: every weight drawn from N(0, std), norms set to 1 (0.08, larger than nn.Linear's
        init, makes blocks change their input visibly); None keeps the modules' own init.
    """
    config = dict(config or TINY_CONFIG)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = LlamaModel(ModelConfig.from_hf(config))
    if std is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.normal_(0, std)  # norms are drawn too (then set to 1): a stable random stream
                if "norm" in name:
                    p.fill_(1.0)
    tensors = {f"model.layers.{k}": v for k, v in model.span.blocks.state_dict().items()}
    tensors["model.embed_tokens.weight"] = model.client.embed_tokens.weight
    tensors["model.norm.weight"] = model.client.norm.weight
    tensors["lm_head.weight"] = model.client.lm_head.weight
    save_file(
        {k: v.detach().contiguous().clone() for k, v in tensors.items()},
        str(folder / "model.safetensors"),
    )
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return folder
