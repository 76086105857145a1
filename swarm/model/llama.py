"""A Llama-family transformer of our own: RMSNorm, RoPE, grouped-query attention, SwiGLU.

Split into `ClientParts` (embeddings, final norm, head) and `Block`s; a peer runs a span of blocks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from swarm.model.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 as HF does, so half-precision inputs match the reference.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies of RoPE, with linear or Llama-3 scaling applied."""
    d = config.head_dim
    # An explicit CPU device: under a meta-device context arange would import torch._dynamo (10 s).
    exponents = torch.arange(0, d, 2, dtype=torch.float64, device="cpu") / d
    inv_freq = 1.0 / (config.rope_theta**exponents)
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths are slowed down by `factor`, short ones kept, the middle blended.
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        middle = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(middle, blended, scaled)
    elif kind != "default":
        raise ValueError(f"unsupported rope scaling {kind!r}")
    return inv_freq.float()


def rope_cos_sin(
    inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape [T, head_dim] for absolute positions [T]."""
    freqs = positions.float()[:, None] * inv_freq.to(positions.device)[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # HF layout: the two halves of head_dim are the real and imaginary parts.
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class KVCache(nn.Module):
    """Keys and values of one block for one session: [batch, kv_heads, max_len, head_dim]."""

    def __init__(self, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype, device=None):
        super().__init__()
        shape = (batch, kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor):
        """Write keys/values at positions [start, start+T); return everything up to start+T."""
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, d
        bias = config.attention_bias
        self.q_proj = nn.Linear(h, config.num_heads * d, bias=bias)
        self.k_proj = nn.Linear(h, config.num_kv_heads * d, bias=bias)
        self.v_proj = nn.Linear(h, config.num_kv_heads * d, bias=bias)
        self.o_proj = nn.Linear(config.num_heads * d, h, bias=config.o_proj_bias)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        start: int,
        cache: KVCache | None,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(start, k, v)
        if k.shape[2] == t:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1, enable_gqa=True)
        else:
            # Query i sits at absolute position start+i and sees keys 0..start+i.
            q_pos = torch.arange(start, start + t, device=x.device)[:, None]
            mask = torch.arange(k.shape[2], device=x.device)[None, :] <= q_pos
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """One transformer block; parameter names match HF's `model.layers.{i}.*`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = FeedForward(config)

    def forward(self, x, cos, sin, start: int = 0, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, start, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class BlockSpan(nn.Module):
    """Blocks [start, end) of a model: what a peer hosts."""

    def __init__(self, config: ModelConfig, start: int, end: int):
        super().__init__()
        if not 0 <= start < end <= config.num_layers:
            raise ValueError(
                f"block range {start}:{end} is outside the model's {config.num_layers} blocks"
            )
        self.config, self.start, self.end = config, start, end
        self.blocks = nn.ModuleList(Block(config) for _ in range(start, end))
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def __len__(self) -> int:
        return self.end - self.start

    def new_caches(self, batch: int, max_len: int, dtype=None, device=None) -> list[KVCache]:
        c = self.config
        dtype = dtype or self.inv_freq.dtype
        device = device or self.inv_freq.device
        return [
            KVCache(batch, c.num_kv_heads, max_len, c.head_dim, dtype, device) for _ in self.blocks
        ]

    def forward(
        self,
        hidden: torch.Tensor,
        start_pos: int = 0,
        caches: list[KVCache] | None = None,
        first: int | None = None,
        last: int | None = None,
    ) -> torch.Tensor:
        """Run blocks [first, last) (absolute indices, default: the whole span) on [B, T, H]."""
        first = self.start if first is None else first
        last = self.end if last is None else last
        if not self.start <= first < last <= self.end:
            raise ValueError(f"blocks {first}:{last} are not inside span {self.start}:{self.end}")
        t = hidden.shape[1]
        positions = torch.arange(start_pos, start_pos + t, device=hidden.device)
        cos, sin = rope_cos_sin(self.inv_freq, positions, hidden.dtype)
        for i in range(first - self.start, last - self.start):
            cache = caches[i] if caches is not None else None
            hidden = self.blocks[i](hidden, cos, sin, start_pos, cache)
        return hidden


class ClientParts(nn.Module):
    """Embeddings, final norm and LM head: what a client keeps locally."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden))


class LlamaModel(nn.Module):
    """The whole model in one process: client parts plus every block (local generation)."""

    def __init__(self, config: ModelConfig, client: ClientParts | None = None, span=None):
        super().__init__()
        self.config = config
        self.client = client if client is not None else ClientParts(config)
        self.span = span if span is not None else BlockSpan(config, 0, config.num_layers)

    def new_caches(self, batch: int, max_len: int) -> list[KVCache]:
        return self.span.new_caches(batch, max_len, dtype=self.client.embed_tokens.weight.dtype)

    def forward(
        self, input_ids: torch.Tensor, start_pos: int = 0, caches: list[KVCache] | None = None
    ) -> torch.Tensor:
        hidden = self.span(self.client.embed(input_ids), start_pos, caches)
        return self.client.logits(hidden)
