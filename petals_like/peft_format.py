"""Adapters on disk: LoRA as a PEFT folder (peft and transformers load it), prompts as safetensors.

Used by DistributedModelForCausalLM (save_adapter, adapter=), swarm-finetune, swarm-generate.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from petals_like.tuning import RemoteTuning, TuningConfig
from swarm.errors import BadRequest
from swarm.model.config import ModelConfig
from swarm.model.lora import PROMPT, TARGETS

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PROMPTS_FILE, TUNING_FILE = "prompts.safetensors", "tuning.json"
CLIENT_FILE = "client_parts.safetensors"  # trained embeddings / head, if any
PEFT_PREFIX = "base_model.model.model.layers."


def peft_key(block: int, name: str) -> str:
    """(0, "q_proj.lora_A") -> base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight."""
    target, part = name.split(".")
    return f"{PEFT_PREFIX}{block}.{TARGETS[target]}.{part}.weight"


def save_adapter(tuning: RemoteTuning, folder: str | Path, base_model: str, client_parts=None):
    """Write `tuning` to `folder`: PEFT's two files for LoRA, prompts.safetensors for prompts."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tc = tuning.tuning
    (folder / TUNING_FILE).write_text(json.dumps(tc.__dict__, indent=1))
    if tc.method == "lora":
        spec = tuning.spec
        tensors = {}
        for b, name, p in tuning.named_block_params(0, len(tuning.blocks)):
            tensors[peft_key(b, name)] = p.detach().float().contiguous().clone()
        save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": spec.rank,
            "lora_alpha": spec.alpha,
            "lora_dropout": spec.dropout,
            "target_modules": sorted(spec.targets),
            "bias": "none",
            "fan_in_fan_out": False,
            "inference_mode": True,
            "init_lora_weights": True,
            "use_rslora": False,
            "use_dora": False,
            "modules_to_save": None,
        }
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=1))
    else:
        tensors = {"prompts": tuning.prompts.detach().float().contiguous().clone()}
        deep = tuning.deep_prompts()
        if deep is not None:
            tensors["deep_prompts"] = deep.detach().float().contiguous().clone()
        save_file(tensors, str(folder / PROMPTS_FILE))
    if client_parts is not None and (tc.train_embeddings or tc.train_head):
        parts = {}
        if tc.train_embeddings:
            parts["embed_tokens.weight"] = client_parts.embed_tokens.weight.detach().clone()
        if tc.train_head:
            parts["lm_head.weight"] = client_parts.lm_head.weight.detach().clone()
        save_file(parts, str(folder / CLIENT_FILE))


def load_adapter(folder: str | Path, config: ModelConfig, client_parts=None) -> RemoteTuning:
    """A RemoteTuning from a PEFT LoRA folder (ours or peft's) or our soft-prompt folder."""
    folder = Path(folder)
    if (folder / CONFIG_FILE).exists():
        tuning = _load_peft(folder, config)
    elif (folder / PROMPTS_FILE).exists():
        tuning = _load_prompts(folder, config)
    else:
        raise BadRequest(f"{folder} holds no {CONFIG_FILE} (PEFT LoRA) nor {PROMPTS_FILE}")
    if client_parts is not None and (folder / CLIENT_FILE).exists():
        for name, t in load_file(str(folder / CLIENT_FILE)).items():
            module, _ = name.split(".")
            if module not in ("embed_tokens", "lm_head"):
                raise BadRequest(f"{CLIENT_FILE}: unexpected tensor {name}")
            weight = getattr(client_parts, module).weight
            if t.shape != weight.shape:
                raise BadRequest(f"{CLIENT_FILE}: {name} has shape {list(t.shape)}")
            with torch.no_grad():
                weight.copy_(t)
    return tuning


def _load_peft(folder: Path, config: ModelConfig) -> RemoteTuning:
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise BadRequest(f"{folder}: only LoRA adapters are supported, not {cfg['peft_type']}")
    targets = cfg.get("target_modules")
    if isinstance(targets, str) or not targets:
        raise BadRequest(f"{folder}: target_modules must be a list of module names")
    for key in ("use_dora", "layers_to_transform", "modules_to_save", "rank_pattern"):
        if cfg.get(key):
            raise BadRequest(f"{folder}: PEFT option {key} is not supported")
    if cfg.get("bias", "none") != "none":
        raise BadRequest(f"{folder}: LoRA biases are not supported (bias must be 'none')")
    rank, alpha = int(cfg["r"]), float(cfg.get("lora_alpha", 8))
    if cfg.get("use_rslora"):
        alpha = alpha * math.sqrt(rank)  # rsLoRA scales by alpha / sqrt(r)
    tc = TuningConfig(
        method="lora",
        rank=rank,
        alpha=alpha,
        dropout=float(cfg.get("lora_dropout", 0.0)),
        targets=[str(t) for t in targets],
    )
    tuning = RemoteTuning(config, tc)
    tensors: dict[int, dict[str, torch.Tensor]] = {}
    paths = {v: k for k, v in TARGETS.items()}
    for key, t in load_file(str(folder / WEIGHTS_FILE)).items():
        rest = key.removeprefix(PEFT_PREFIX)
        parts = rest.split(".")
        # layers.{i}.{self_attn|mlp}.{target}.{lora_A|lora_B}[.default].weight
        if rest == key or len(parts) < 5 or parts[-1] != "weight":
            raise BadRequest(f"{folder}: unexpected tensor {key}")
        block, target, part = int(parts[0]), paths.get(".".join(parts[1:3])), parts[3]
        if target is None or part not in ("lora_A", "lora_B"):
            raise BadRequest(f"{folder}: unexpected tensor {key}")
        tensors.setdefault(block, {})[f"{target}.{part}"] = t.float()
    missing = [
        (b, n)
        for b, n, _ in tuning.named_block_params(0, config.num_layers)
        if n not in tensors.get(b, {})
    ]
    if missing:
        raise BadRequest(f"{folder}: the adapter lacks {len(missing)} tensors, e.g. {missing[0]}")
    tuning.load_block_tensors(tensors)
    return tuning


def _load_prompts(folder: Path, config: ModelConfig) -> RemoteTuning:
    tensors = load_file(str(folder / PROMPTS_FILE))
    prompts = tensors.get("prompts")
    if prompts is None or prompts.dim() != 2 or prompts.shape[1] != config.hidden_size:
        raise BadRequest(f"{folder}: prompts must be [pre_seq_len, {config.hidden_size}]")
    deep = tensors.get("deep_prompts")
    method = "deep_ptune" if deep is not None else "ptune"
    tuning = RemoteTuning(config, TuningConfig(method=method, pre_seq_len=prompts.shape[0]))
    with torch.no_grad():
        tuning.prompts.copy_(prompts)
    if deep is not None:
        want = (config.num_layers, prompts.shape[0], config.hidden_size)
        if tuple(deep.shape) != want:
            raise BadRequest(f"{folder}: deep_prompts must be {list(want)}")
        tuning.load_block_tensors({b: {PROMPT: deep[b]} for b in range(config.num_layers)})
    return tuning
