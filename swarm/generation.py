"""Token sampling (greedy, temperature, top-k, top-p, repetition penalty) and the generation loop.

Used by `swarm-generate --local`, the distributed client's generate(), demos and benchmarks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

import torch

from swarm.errors import BadRequest
from swarm.model.config import ModelConfig
from swarm.model.llama import LlamaModel

logger = logging.getLogger(__name__)


@dataclass
class SamplingConfig:
    """How the next token is chosen; `swarm-generate`'s sampling flags are generated from it."""

    temperature: float = field(
        default=0.0,
        metadata={
            "help": "0 picks the most likely token (greedy); above 0 samples from "
            "softmax(logits / T)"
        },
    )
    top_k: int = field(
        default=0, metadata={"help": "sample among the k most likely tokens (0: all)"}
    )
    top_p: float = field(
        default=1.0,
        metadata={
            "help": "sample among the fewest most likely tokens whose probability reaches "
            "p (1: all)"
        },
    )
    repetition_penalty: float = field(
        default=1.0,
        metadata={"help": "above 1 discourages tokens already seen (CTRL / transformers)"},
    )
    seed: int | None = field(
        default=None,
        metadata={"help": "seed of the sampler, so a run repeats exactly (default: random)"},
    )

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


def adjusted_logits(
    logits: torch.Tensor,
    prev_ids: torch.Tensor | Sequence[Sequence[int]] | None,
    cfg: SamplingConfig,
) -> torch.Tensor:
    """fp32 logits [B, V] with the repetition penalty applied (what greedy takes the argmax of)."""
    logits = logits.float()
    if prev_ids is not None and cfg.repetition_penalty != 1.0:
        prev = torch.as_tensor(prev_ids, dtype=torch.long, device=logits.device)
        logits = apply_repetition_penalty(
            logits, prev.reshape(logits.shape[0], -1), cfg.repetition_penalty
        )
    return logits


def next_token_probs(
    logits: torch.Tensor,
    prev_ids: torch.Tensor | Sequence[Sequence[int]] | None,
    cfg: SamplingConfig,
) -> torch.Tensor:
    """The distribution [B, V] that sampling at temperature > 0 draws from."""
    logits = adjusted_logits(logits, prev_ids, cfg)
    return filter_top_k_top_p(logits / cfg.temperature, cfg.top_k, cfg.top_p).softmax(-1)


def sample_next(
    logits: torch.Tensor,
    prev_ids: torch.Tensor | Sequence[Sequence[int]] | None,
    cfg: SamplingConfig,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The next token of each row: logits [B, V], prev_ids [B, T] (prompt and generated so far)."""
    if logits.dim() != 2:
        raise BadRequest(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
    if cfg.temperature == 0.0:
        return adjusted_logits(logits, prev_ids, cfg).argmax(-1)
    probs = next_token_probs(logits, prev_ids, cfg)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def eos_ids(tokenizer: object | None, config: ModelConfig) -> list[int]:
    """End-of-sequence ids: the tokenizer's `eos_token_ids` if it has any, else the config's."""
    return sorted(set(getattr(tokenizer, "eos_token_ids", None) or config.eos_token_id))


# Prompts are prefilled in steps of this many tokens: bounded memory and request sizes, and a
# long prompt can show progress.
PREFILL_CHUNK = 512


def new_token_budget(prompt_len: int, max_new_tokens: int, context: int) -> int:
    """How many new tokens fit after a prompt: `max_new_tokens`, or fewer at the context's end.

    Raises BadRequest for an empty prompt, one that fills the context, or a negative count.
    """
    if prompt_len == 0:
        raise BadRequest("the prompt is empty")
    if prompt_len >= context:
        raise BadRequest(f"the prompt has {prompt_len} tokens; the model's context is {context}")
    if max_new_tokens < 0:
        raise BadRequest(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    return min(max_new_tokens, context - prompt_len)


def generation_loop(
    step: Callable[[torch.Tensor], torch.Tensor],
    feed: torch.Tensor,
    history: torch.Tensor,
    max_new_tokens: int,
    sampling: SamplingConfig,
    eos: Collection[int] = (),
    stop_on_eos: bool = True,
    on_token: Callable[[torch.Tensor], None] | None = None,
    on_prefill: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Sample up to `max_new_tokens` new tokens per row; returns them as [B, new].

    step: token ids [B, T] at the next T positions -> logits [B, V] of the last one (it owns the
        caches, local or on the swarm).
    feed: [B, T] ids of the first step. history: [B, S] every id so far, feed included (what the
        repetition penalty looks at).
    eos, stop_on_eos: a row that sampled an id of `eos` is finished and pads with eos from then
        on; the loop stops when every row is finished.
    on_token: called with each new [B] tensor of ids, as soon as it is sampled (streaming).
    on_prefill: called with (tokens done, tokens in all) after each PREFILL_CHUNK of a feed
        longer than that (progress of a long prompt).
    """
    generator = sampling.make_generator()
    eos_t = torch.tensor(sorted(eos), dtype=torch.long)
    pad = int(eos_t[0]) if len(eos_t) else 0
    finished = torch.zeros(feed.shape[0], dtype=torch.bool)
    new: list[torch.Tensor] = []
    step_input = feed
    for done in range(PREFILL_CHUNK, feed.shape[1], PREFILL_CHUNK):
        if not max_new_tokens:
            break
        step(feed[:, done - PREFILL_CHUNK : done])
        if on_prefill is not None:
            on_prefill(done, feed.shape[1])
        step_input = feed[:, done:]
    while len(new) < max_new_tokens:
        nxt = sample_next(step(step_input), history, sampling, generator)
        if stop_on_eos:
            nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
        new.append(nxt)
        history = torch.cat([history, nxt[:, None]], dim=1)
        if on_token is not None:
            on_token(nxt)
        if stop_on_eos:
            finished |= torch.isin(nxt, eos_t)
            if bool(finished.all()):
                break
        step_input = nxt[:, None]
    if not new:
        return torch.zeros(feed.shape[0], 0, dtype=torch.long)
    return torch.stack(new, dim=1)


@torch.inference_mode()
def generate_local(
    model: LlamaModel,
    tokenizer: object | None,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    sampling: SamplingConfig | None = None,
    stop_on_eos: bool = True,
    on_token: Callable[[int], None] | None = None,
    on_prefill: Callable[[int, int], None] | None = None,
    speculative: object | None = None,
    stats: object | None = None,
) -> list[int]:
    """Generate up to `max_new_tokens` after `prompt_ids` with the KV cache; returns new ids only.

    Stops early at the model's context (see `new_token_budget`). tokenizer: gives
    `eos_token_ids` (falls back to the config's). on_token: called per new token. on_prefill:
    as in `generation_loop`. speculative: "ngram", a draft model's path or a drafter
    (swarm.speculative); stats: a swarm.speculative.SpeculativeStats to fill.
    """
    sampling = sampling or SamplingConfig()
    prompt = [int(t) for t in prompt_ids]
    max_new_tokens = new_token_budget(
        len(prompt), max_new_tokens, model.config.max_position_embeddings
    )
    length = len(prompt) + max_new_tokens
    caches = model.new_caches(1, length)
    pos = 0
    ids = torch.tensor([prompt], dtype=torch.long)
    eos = eos_ids(tokenizer, model.config)
    emit = None if on_token is None else lambda nxt: on_token(int(nxt[0]))
    if speculative is not None:
        from swarm.speculative import make_drafter, speculative_loop

        def step_all(x: torch.Tensor) -> torch.Tensor:
            nonlocal pos
            logits = model(x, pos, caches)[0]
            pos += x.shape[1]
            return logits

        def rollback(n: int) -> None:
            nonlocal pos
            pos = n  # later writes at these positions overwrite the rejected ones

        new = speculative_loop(
            step_all,
            rollback,
            0,
            ids,
            ids,
            max_new_tokens,
            sampling,
            make_drafter(speculative, length),
            eos,
            stop_on_eos,
            emit,
            on_prefill,
            room=length,
            stats=stats,
        )
        return new[0].tolist()

    def step(x: torch.Tensor) -> torch.Tensor:
        nonlocal pos
        logits = model(x, pos, caches)[:, -1]
        pos += x.shape[1]
        return logits

    new = generation_loop(
        step, ids, ids, max_new_tokens, sampling, eos, stop_on_eos, emit, on_prefill
    )
    return new[0].tolist()
