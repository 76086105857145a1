"""Speculative decoding: draft k tokens cheaply, verify them in one step of k+1 positions.

Used by `swarm.generation` (`--local`) and petals_like's generate() (one chain round trip verifies
a whole draft). Greedy output equals plain greedy; with temperature > 0 tokens follow the target
model's distribution (rejection sampling, Leviathan et al. 2023).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import torch

from swarm.errors import BadRequest
from swarm.generation import PREFILL_CHUNK, adjusted_logits, next_token_probs, sample_next

logger = logging.getLogger(__name__)

K_START, K_MAX = 4, 16  # draft length at first, and its bound (a verify step is k+1 positions)


@dataclass
class Draft:
    """Proposed tokens and, for sampled drafts, each token's draft distribution q [k, V]."""

    tokens: list[int]
    q: torch.Tensor | None = None  # None: deterministic drafts (q is one-hot on each token)


class NgramDrafter:
    """Prompt lookup: the tokens that followed the last earlier occurrence of the current suffix.

    max_ngram..min_ngram: suffix lengths tried, longest first. No model: drafts cost nothing, so
    text that repeats itself (code, quotes, lists, chat that echoes its prompt) speeds up most.
    """

    name = "ngram"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, tokens: Sequence[int], k: int, sampling=None, generator=None) -> Draft:
        n_tok = len(tokens)
        for n in range(min(self.max_ngram, n_tok - 1), self.min_ngram - 1, -1):
            suffix = list(tokens[n_tok - n :])
            # The latest earlier match predicts best (what the text did most recently).
            for start in range(n_tok - n - 1, -1, -1):
                if list(tokens[start : start + n]) == suffix:
                    follow = list(tokens[start + n : start + n + k])
                    if follow:
                        return Draft(follow)
        return Draft([])

    def rollback(self, n_tokens: int) -> None:
        """Nothing to undo: the drafter keeps no state."""


class ModelDrafter:
    """A small local model with the target's tokenizer drafts greedily (or by sampling).

    model: a swarm.model.LlamaModel; it keeps its own KV cache of up to `max_len` positions.
    """

    name = "model"

    def __init__(self, model, max_len: int):
        self.model = model
        self.caches = model.new_caches(1, max_len)
        self.max_len = max_len
        self.cached: list[int] = []  # tokens whose keys and values the cache holds, in order
        self._logits: torch.Tensor | None = None  # next-token logits after `cached`

    def _feed(self, tokens: Sequence[int]) -> torch.Tensor:
        keep = 0
        while keep < min(len(self.cached), len(tokens)) and self.cached[keep] == tokens[keep]:
            keep += 1
        if keep == len(tokens) and keep == len(self.cached) and self._logits is not None:
            return self._logits
        if keep == len(tokens):  # everything is cached but the logits of the last: redo it
            keep -= 1
        x = torch.tensor([list(tokens[keep:])], dtype=torch.long)
        self._logits = self.model(x, keep, self.caches)[0, -1].float()
        self.cached = list(tokens)
        return self._logits

    @torch.inference_mode()
    def propose(self, tokens: Sequence[int], k: int, sampling=None, generator=None) -> Draft:
        k = min(k, self.max_len - len(tokens))
        if k <= 0:
            return Draft([])
        seq = list(tokens)
        out, qs = [], []
        greedy = sampling is None or sampling.temperature == 0
        for _ in range(k):
            logits = self._feed(seq)
            if greedy:
                t = int(logits.argmax())
            else:
                q = next_token_probs(logits[None], torch.tensor([seq]), sampling)[0]
                t = int(torch.multinomial(q, 1, generator=generator))
                qs.append(q)
            out.append(t)
            seq.append(t)
        return Draft(out, None if greedy else torch.stack(qs))

    def rollback(self, n_tokens: int) -> None:
        """Forget cached tokens past the first `n_tokens` (they were rejected)."""
        if len(self.cached) > n_tokens:
            self.cached = self.cached[:n_tokens]
            self._logits = None


def make_drafter(spec, max_len: int):
    """A drafter from `--speculative`: "ngram", a model path or alias, or a drafter object."""
    if spec is None or hasattr(spec, "propose"):
        return spec
    if spec == "ngram":
        return NgramDrafter()
    from swarm.model.loading import load_model, resolve_model

    try:
        model = load_model(resolve_model(str(spec)), progress=False)
    except Exception as e:
        raise BadRequest(
            f"--speculative {spec!r}: not 'ngram' nor a loadable draft model: {e}"
        ) from e
    return ModelDrafter(model, max_len)


@dataclass
class SpeculativeStats:
    """Rounds (one verify step each: one chain round trip on the swarm) and what they gave."""

    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    tokens: int = 0

    @property
    def tokens_per_round(self) -> float:
        return self.tokens / self.rounds if self.rounds else 0.0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def summary(self, name: str) -> str:
        return (
            f"speculative {name}: {self.tokens} tokens in {self.rounds} verify steps "
            f"({self.tokens_per_round:.2f} tokens per chain round trip), "
            f"{self.accepted}/{self.drafted} drafted tokens accepted"
        )


def verify(
    logits: torch.Tensor,
    draft: Draft,
    history: list[int],
    sampling,
    generator: torch.Generator | None,
) -> list[int]:
    """The tokens a verify step yields: the accepted draft prefix, then one token of the target.

    logits [len(draft) + 1, V]: row i is the target's next-token logits after the draft's first
    i tokens. Greedy: accept while the draft equals the argmax, then the argmax. Sampling: accept
    token d with probability min(1, p(d) / q(d)); on rejection sample from max(0, p - q),
    renormalized; after a fully accepted draft sample from the last row. Either way the tokens
    are distributed as the target model's own sampling.
    """
    seq = list(history)
    out: list[int] = []
    greedy = sampling.temperature == 0
    for i, d in enumerate(draft.tokens):
        if greedy:
            best = int(adjusted_logits(logits[i : i + 1], [seq], sampling).argmax(-1)[0])
            out.append(best)
            if best != d:
                return out
            seq.append(d)
            continue
        p = next_token_probs(logits[i : i + 1], torch.tensor([seq]), sampling)[0]
        q_d = 1.0 if draft.q is None else float(draft.q[i, d])
        u = float(torch.rand((), generator=generator))
        if q_d > 0 and u < min(1.0, float(p[d]) / q_d):
            out.append(d)
            seq.append(d)
            continue
        if draft.q is None:
            residual = p.clone()
            residual[d] = 0.0
        else:
            residual = (p - draft.q[i]).clamp_min(0.0)
        total = float(residual.sum())
        dist = residual / total if total > 0 else p
        out.append(int(torch.multinomial(dist, 1, generator=generator)))
        return out
    last = logits[len(draft.tokens) : len(draft.tokens) + 1]
    if greedy:
        out.append(int(adjusted_logits(last, [seq], sampling).argmax(-1)[0]))
    else:
        p = next_token_probs(last, torch.tensor([seq]), sampling)[0]
        out.append(int(torch.multinomial(p, 1, generator=generator)))
    return out


def speculative_loop(
    step_all: Callable[[torch.Tensor], torch.Tensor],
    rollback: Callable[[int], None],
    position: int,
    feed: torch.Tensor,
    history: torch.Tensor,
    max_new_tokens: int,
    sampling,
    drafter,
    eos: Collection[int] = (),
    stop_on_eos: bool = True,
    on_token: Callable[[torch.Tensor], None] | None = None,
    on_prefill: Callable[[int, int], None] | None = None,
    room: int | None = None,
    stats: SpeculativeStats | None = None,
) -> torch.Tensor:
    """generation_loop's contract with drafts verified k at a time; returns [1, new] ids.

    step_all: ids [1, T] at the next T positions -> logits [T, V] of every one of them (it owns
        the caches). rollback(n): the caches keep their first n positions only (later writes at
        those positions overwrite). position: positions the caches hold before `feed`.
    room: most positions the caches may hold (k is cut to fit). stats: filled as it goes.
    """
    if feed.shape[0] != 1:
        raise BadRequest("speculative decoding takes one sequence at a time (batch 1)")
    stats = stats if stats is not None else SpeculativeStats()
    generator = sampling.make_generator()
    eos_set = set(eos)
    tokens = history[0].tolist()
    new: list[int] = []
    if not max_new_tokens:
        return torch.zeros(1, 0, dtype=torch.long)
    chunks = list(range(0, feed.shape[1], PREFILL_CHUNK))
    logits = None
    for n, start in enumerate(chunks):
        logits = step_all(feed[:, start : start + PREFILL_CHUNK])
        if on_prefill is not None and n < len(chunks) - 1:
            on_prefill(start + PREFILL_CHUNK, feed.shape[1])
    position += feed.shape[1]
    stats.rounds += 1
    pending = int(sample_next(logits[-1:], torch.tensor([tokens]), sampling, generator)[0])

    def emit(t: int) -> bool:
        """Record a new token; True when generation must stop."""
        new.append(t)
        tokens.append(t)
        stats.tokens += 1
        if on_token is not None:
            on_token(torch.tensor([t]))
        return len(new) >= max_new_tokens or (stop_on_eos and t in eos_set)

    k = K_START
    if emit(pending):
        return torch.tensor([new])
    while True:
        limit = min(k, max_new_tokens - len(new) - 1)
        if room is not None:
            limit = min(limit, room - position - 1)
        draft = drafter.propose(tokens, limit, sampling, generator) if limit > 0 else Draft([])
        draft = Draft(draft.tokens[: max(0, limit)], None if draft.q is None else draft.q[:limit])
        inp = torch.tensor([[pending, *draft.tokens]], dtype=torch.long)
        logits = step_all(inp)
        stats.rounds += 1
        got = verify(logits, draft, tokens, sampling, generator)
        accepted = len(got) - 1
        stats.drafted += len(draft.tokens)
        stats.accepted += accepted
        # The caches hold pending and every draft token; keep pending and the accepted ones.
        position += 1 + accepted
        if accepted < len(draft.tokens):
            rollback(position)
        drafter.rollback(len(tokens) + accepted)
        for t in got:
            if emit(t):
                return torch.tensor([new])
        pending = got[-1]
        if draft.tokens:
            # Grow k while drafts are taken whole; after a rejection, draft what was accepted.
            k = min(K_MAX, k * 2) if accepted == len(draft.tokens) else max(1, accepted + 1)
