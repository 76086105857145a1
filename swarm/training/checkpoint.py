"""Saving what SWARM training produced as a Hugging Face-style folder the mesh can load and serve.

Used by `swarm-train --save DIR` (client parts here, every stage's span downloaded from a replica)
and by a training stage that saves its own part.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from hivemind import DHT

from swarm.errors import CheckpointError, PeerUnavailable
from swarm.model import BlockSpan, ClientParts, ModelConfig
from swarm.model.tokenizer import Tokenizer
from swarm.training.averaging import StageAverager
from swarm.training.progress import stage_prefix

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def span_tensors(span: BlockSpan) -> dict[str, torch.Tensor]:
    """The span's weights under Hugging Face names (`model.layers.{i}.*`)."""
    out = {}
    for name, t in span.blocks.state_dict().items():
        index, rest = name.split(".", 1)
        out[f"model.layers.{span.start + int(index)}.{rest}"] = t.detach().float().contiguous()
    return out


def client_tensors(client: ClientParts) -> dict[str, torch.Tensor]:
    out = {
        "model.embed_tokens.weight": client.embed_tokens.weight,
        "model.norm.weight": client.norm.weight,
        "lm_head.weight": client.lm_head.weight,
    }
    # Tied weights are one tensor; safetensors refuses shared storage, so store copies.
    return {k: v.detach().float().clone().contiguous() for k, v in out.items()}


def hf_config(config: ModelConfig) -> dict[str, Any]:
    """A config.json dictionary that `ModelConfig.from_hf` reads back to the same config."""
    cfg: dict[str, Any] = {
        "architectures": [config.architecture],
        "model_type": {
            "LlamaForCausalLM": "llama",
            "MistralForCausalLM": "mistral",
            "Qwen2ForCausalLM": "qwen2",
        }[config.architecture],
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "attention_bias": config.attention_bias,
        "mlp_bias": config.mlp_bias,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id[0]
        if len(config.eos_token_id) == 1
        else config.eos_token_id,
        "torch_dtype": "float32",
    }
    if config.rope_scaling:
        cfg["rope_scaling"] = dict(config.rope_scaling)
    return cfg


def download_span(
    dht: DHT, run_id: str, config: ModelConfig, start: int, end: int, timeout: float = 60.0
) -> BlockSpan:
    """Blocks [start, end) with the weights of the freshest live replica of that stage.

    Call from the main thread (hivemind's averager sets a signal handler when it starts).
    """
    averager = StageAverager(
        [torch.zeros(1)],
        dht,
        prefix=stage_prefix(run_id, start, end),
        min_matchmaking_time=1.0,
        request_timeout=0.5,
        next_chunk_timeout=timeout / 2,
    )
    try:
        metadata, tensors = averager.download_state(timeout)
    finally:
        averager.shutdown()
    span = BlockSpan(config, start, end)
    params = list(span.parameters())
    if list(metadata.get("span", [])) != [start, end] or len(tensors) < len(params):
        raise PeerUnavailable(f"stage {start}:{end} sent state of {metadata.get('span')}")
    with torch.no_grad():
        for p, t in zip(params, tensors[: len(params)], strict=True):
            if p.shape != t.shape:
                raise PeerUnavailable(f"stage {start}:{end} sent a tensor of shape {t.shape}")
            p.copy_(t)
    return span


def write_folder(
    folder: str | Path,
    config: ModelConfig,
    tensors: dict[str, torch.Tensor],
    source_folder: Path | None = None,
    tokenizer: Tokenizer | None = None,
) -> Path:
    """config.json, model.safetensors and the tokenizer (an HF source's files, else `tokenizer`)."""
    from safetensors.torch import save_file

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    if config.tie_word_embeddings:
        tensors = {k: v for k, v in tensors.items() if k != "lm_head.weight"}
    save_file(tensors, str(out / "model.safetensors"))
    source_cfg = source_folder / "config.json" if source_folder is not None else None
    if source_cfg is not None and source_cfg.is_file():
        shutil.copyfile(source_cfg, out / "config.json")
    else:
        (out / "config.json").write_text(json.dumps(hf_config(config), indent=1))
    copied = [
        shutil.copyfile(source_folder / name, out / name)
        for name in TOKENIZER_FILES
        if source_folder is not None and (source_folder / name).is_file()
    ]
    if not copied and tokenizer is not None:  # a GGUF source: its vocabulary, as tokenizer.json
        tokenizer.save(out)
    return out


def save_checkpoint(trainer, folder: str | Path) -> Path:
    """Gather the trainer's client parts and every stage's span into one loadable folder."""
    config = trainer.model_config
    tensors = client_tensors(trainer.client_parts)
    covered = set()
    for start, end in trainer.stages:
        span = download_span(trainer.dht, trainer.config.run_id, config, start, end)
        tensors.update(span_tensors(span))
        covered.update(range(start, end))
    if covered != set(range(config.num_layers)):
        raise CheckpointError(f"stages cover blocks {sorted(covered)}, not the whole model")
    source = trainer.source
    out = write_folder(
        folder, config, tensors, source.path if source.kind == "hf" else None, trainer.tokenizer
    )
    logger.info("saved the trained model to %s", out)
    return out
