"""Token sampling (greedy, temperature, top-k, top-p, repetition penalty) and local generation.

Used by `swarm-generate --local`, the distributed client's generate(), demos and benchmarks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from swarm.errors import BadRequest
from swarm.model.llama import LlamaModel

logger = logging.getLogger(__name__)


@dataclass
class SamplingConfig:
    """How the next token is chosen.

    temperature: 0 picks the most likely token (greedy); above 0 samples from softmax(logits / T).
    top_k: keep only the k most likely tokens (0 keeps all).
    top_p: keep the smallest set of most likely tokens whose probability reaches p (1.0 keeps all).
    repetition_penalty: > 1 discourages tokens already seen (CTRL / transformers semantics).
    seed: seeds the sampler's generator, so a run can be repeated exactly.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise BadRequest(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise BadRequest(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise BadRequest(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise BadRequest(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    def make_generator(self) -> torch.Generator:
        g = torch.Generator()
        if self.seed is not None:
            g.manual_seed(self.seed)
        else:
            g.seed()
        return g


def apply_repetition_penalty(
    logits: torch.Tensor, prev_ids: torch.Tensor, penalty: float
) -> torch.Tensor:
    """Divide positive logits of seen tokens by `penalty`, multiply negative ones by it."""
    if penalty == 1.0 or prev_ids.numel() == 0:
        return logits
    seen = torch.gather(logits, 1, prev_ids)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(1, prev_ids, seen)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top-k / nucleus to -inf; the most likely token always stays."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens before it already reach top_p.
        drop = (cum - sorted_logits.softmax(-1)) >= top_p
        drop[..., 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sample_next(
    logits: torch.Tensor,
    prev_ids: torch.Tensor | Sequence[Sequence[int]] | None,
    cfg: SamplingConfig,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The next token of each row: logits [B, V], prev_ids [B, T] (prompt and generated so far)."""
    if logits.dim() != 2:
        raise BadRequest(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
    logits = logits.float()
    if prev_ids is not None and cfg.repetition_penalty != 1.0:
        prev = torch.as_tensor(prev_ids, dtype=torch.long, device=logits.device)
        logits = apply_repetition_penalty(
            logits, prev.reshape(logits.shape[0], -1), cfg.repetition_penalty
        )
    if cfg.temperature == 0.0:
        return logits.argmax(-1)
    logits = filter_top_k_top_p(logits / cfg.temperature, cfg.top_k, cfg.top_p)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate_local(
    model: LlamaModel,
    tokenizer: object | None,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    sampling: SamplingConfig | None = None,
    stop_on_eos: bool = True,
    on_token: Callable[[int], None] | None = None,
) -> list[int]:
    """Generate up to `max_new_tokens` after `prompt_ids` with the KV cache; returns new ids only.

    tokenizer: gives `eos_token_ids` (falls back to the config's). on_token: called per new token.
    """
    sampling = sampling or SamplingConfig()
    prompt = [int(t) for t in prompt_ids]
    context = model.config.max_position_embeddings
    if not prompt:
        raise BadRequest("the prompt is empty")
    if len(prompt) >= context:
        raise BadRequest(
            f"the prompt has {len(prompt)} tokens; the model's context is {context} tokens"
        )
    if max_new_tokens < 0:
        raise BadRequest(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if len(prompt) + max_new_tokens > context:
        logger.warning("stopping at the model's context of %d tokens", context)
        max_new_tokens = context - len(prompt)
    eos = set(getattr(tokenizer, "eos_token_ids", None) or model.config.eos_token_id)
    generator = sampling.make_generator()
    caches = model.new_caches(1, len(prompt) + max_new_tokens)
    ids = torch.tensor([prompt], dtype=torch.long)
    out: list[int] = []
    pos = 0
    step_input = ids
    while len(out) < max_new_tokens:
        logits = model(step_input, pos, caches)[:, -1]
        pos += step_input.shape[1]
        nxt = sample_next(logits, ids, sampling, generator)
        token = int(nxt[0])
        out.append(token)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        if on_token is not None:
            on_token(token)
        if stop_on_eos and token in eos:
            break
        step_input = nxt[:, None]
    return out
