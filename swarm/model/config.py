"""The model's shape: one dataclass read from a Hugging Face config.json or GGUF metadata.

Used by the model, the loaders, the peer (to validate requests) and the client.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from swarm.errors import CheckpointError

# Architectures whose blocks are ours to run: Llama-family decoder blocks.
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
# GGUF `general.architecture` values we read; their tensors use llama.cpp's Llama names.
GGUF_ARCHITECTURES = ("llama", "mistral", "qwen2")


@dataclass
class ModelConfig:
    """Everything needed to build blocks and client parts of a Llama-family model."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 0  # 0 means hidden_size // num_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    #  "original_max_position_embeddings"} or {"rope_type": "linear", "factor"}.
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v biases (Qwen2; Llama's attention_bias)
    o_proj_bias: bool = False  # Llama's attention_bias also puts a bias on o_proj
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    architecture: str = "LlamaForCausalLM"
    name: str = "model"  # used as the DHT prefix of the model's blocks

    def __post_init__(self) -> None:
        if self.head_dim <= 0:
            self.head_dim = self.hidden_size // self.num_heads
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise CheckpointError(
                f"unsupported architecture {self.architecture!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads"):
            if getattr(self, key) <= 0:
                raise CheckpointError(f"config field {key} must be positive")
        if self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads:
            raise CheckpointError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})"
            )

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], name: str = "model") -> ModelConfig:
        """Read a Hugging Face config.json dictionary."""
        model_type = cfg.get("model_type", "unknown")
        archs = cfg.get("architectures") or [MODEL_TYPES.get(model_type, model_type)]
        arch = archs[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise CheckpointError(
                f"unsupported architecture {arch!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        try:
            eos = cfg.get("eos_token_id")
            eos_list = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
            # transformers 5 writes `rope_parameters`; older ones `rope_theta` + `rope_scaling`.
            rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
            rope_theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
            rope.setdefault("rope_type", rope.get("type", "default"))
            rope_scaling = None if rope["rope_type"] == "default" else rope
            return cls(
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=int(cfg["hidden_size"]),
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=int(cfg["num_attention_heads"]),
                num_kv_heads=int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]),
                head_dim=int(cfg.get("head_dim") or 0),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
                rope_theta=rope_theta,
                rope_scaling=rope_scaling,
                max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                attention_bias=bool(cfg.get("attention_bias", arch == "Qwen2ForCausalLM")),
                o_proj_bias=arch != "Qwen2ForCausalLM" and bool(cfg.get("attention_bias", False)),
                mlp_bias=bool(cfg.get("mlp_bias", False)),
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_id=eos_list,
                architecture=arch,
                name=name,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"config.json is missing or has a bad field: {e}") from e

    @classmethod
    def from_gguf(
        cls, meta: dict[str, Any], name: str = "model", tied: bool = False
    ) -> ModelConfig:
        """Read GGUF metadata (`general.architecture`, `{arch}.block_count`, ...).

        `tied` says the file has no `output.weight`, so the head reuses the embeddings.
        """
        arch = meta.get("general.architecture", "unknown")
        if arch not in GGUF_ARCHITECTURES:
            raise CheckpointError(
                f"unsupported GGUF architecture {arch!r}; "
                f"supported: {', '.join(GGUF_ARCHITECTURES)}"
            )

        def get(key: str, default: Any = None) -> Any:
            value = meta.get(f"{arch}.{key}", default)
            if value is None:
                raise CheckpointError(f"GGUF metadata lacks {arch}.{key}")
            return value

        try:
            num_heads = int(get("attention.head_count"))
            hidden = int(get("embedding_length"))
            tokens = meta.get("tokenizer.ggml.tokens")
            vocab = meta.get(f"{arch}.vocab_size") or (len(tokens) if tokens is not None else None)
            if vocab is None:
                raise CheckpointError("GGUF metadata gives no vocabulary size")
            eos = meta.get("tokenizer.ggml.eos_token_id")
            scaling = meta.get(f"{arch}.rope.scaling.type", "none")
            if scaling not in ("none", "linear"):
                raise CheckpointError(f"unsupported GGUF rope scaling {scaling!r}")
            rope_scaling = None
            if scaling == "linear":
                rope_scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
            return cls(
                vocab_size=int(vocab),
                hidden_size=hidden,
                intermediate_size=int(get("feed_forward_length")),
                num_layers=int(get("block_count")),
                num_heads=num_heads,
                num_kv_heads=int(get("attention.head_count_kv", num_heads)),
                head_dim=int(meta.get(f"{arch}.attention.key_length") or 0),
                rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
                rope_theta=float(get("rope.freq_base", 10000.0)),
                rope_scaling=rope_scaling,
                max_position_embeddings=int(get("context_length", 2048)),
                tie_word_embeddings=tied,
                attention_bias=arch == "qwen2",
                bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
                eos_token_id=[] if eos is None else [int(eos)],
                architecture=MODEL_TYPES[arch],
                name=name,
            )
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"GGUF metadata has a bad field: {e}") from e

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def num_params_per_block(self) -> int:
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * d * (self.num_heads * 2 + self.num_kv_heads * 2)
        return attn + 3 * h * i + 2 * h
