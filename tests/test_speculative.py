"""Speculative decoding: drafts, verification (greedy and rejection sampling), the local loop.

Tests swarm/speculative.py; through real peers in tests/client/test_scenarios.py.
"""

from __future__ import annotations

import pytest
import torch

from swarm.generation import SamplingConfig, generate_local, next_token_probs
from swarm.model.config import ModelConfig
from swarm.model.llama import LlamaModel
from swarm.speculative import Draft, ModelDrafter, NgramDrafter, SpeculativeStats, verify


def tiny(vocab: int = 32, seed: int = 0) -> LlamaModel:
    torch.manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=256,
        eos_token_id=[vocab - 1],
        name="tiny",
    )
    model = LlamaModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)  # peaked enough that greedy text repeats itself
    return model


def test_ngram_drafts_what_followed_the_latest_match():
    d = NgramDrafter(max_ngram=3)
    assert d.propose([1, 2, 3, 9, 1, 2, 3, 7, 5, 1, 2, 3], 2).tokens == [7, 5]
    assert d.propose([4, 5, 6], 3).tokens == []  # nothing repeats
    assert d.propose([8, 8, 8], 4).tokens == [8]  # a match at the end has little after it


def test_greedy_verification_keeps_the_agreeing_prefix_and_the_targets_token():
    logits = torch.full((4, 6), -5.0)
    for row, best in enumerate([2, 3, 1, 4]):
        logits[row, best] = 5.0
    greedy = SamplingConfig()
    assert verify(logits, Draft([2, 3, 1]), [0], greedy, None) == [2, 3, 1, 4]  # all, plus one
    assert verify(logits, Draft([2, 5, 1]), [0], greedy, None) == [2, 3]  # cut at the miss
    assert verify(logits[:1], Draft([]), [0], greedy, None) == [2]


@pytest.mark.parametrize("drafts", ["one-hot", "model"])
def test_rejection_sampling_gives_the_targets_distribution_on_a_tiny_model(drafts):
    # Target and draft logits from two different tiny models after the same prefix.
    target, draft_model = tiny(8, seed=1), tiny(8, seed=2)
    prefix = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        t_logits = target(prefix, 0, target.new_caches(1, 16))[0, -1:]
        d_logits = draft_model(prefix, 0, draft_model.new_caches(1, 16))[0, -1:]
    cfg = SamplingConfig(temperature=0.9, top_p=0.95)
    p = next_token_probs(t_logits, prefix, cfg)[0]
    q = next_token_probs(d_logits, prefix, cfg)[0]
    g = torch.Generator().manual_seed(1234)  # a fixed stream: the test cannot flake
    n, counts = 20000, torch.zeros(8)
    rows = torch.cat([t_logits, t_logits])  # a 1-token draft, then the bonus row
    for _ in range(n):
        if drafts == "one-hot":
            d = 2  # a fixed guess: accepted with probability p(2)
            out = verify(rows, Draft([d]), prefix[0].tolist(), cfg, g)
        else:
            d = int(torch.multinomial(q, 1, generator=g))
            out = verify(rows, Draft([d], q[None]), prefix[0].tolist(), cfg, g)
        counts[out[0]] += 1
    expected = p * n
    keep = expected > 5  # chi-square on the categories with enough mass
    chi2 = float((((counts - expected) ** 2) / expected)[keep].sum())
    assert int((counts[~keep]).sum()) <= max(10, int(expected[~keep].sum() * 3))
    assert chi2 < 24.3, (chi2, counts / n, p)  # 24.3: the 0.1% critical value for 7 df


@pytest.mark.parametrize("how", ["ngram", "model"])
def test_speculative_greedy_equals_plain_greedy(how):
    model = tiny()
    prompt = [1, 5, 9, 2, 5, 9, 2, 5, 9, 2]
    plain = generate_local(model, None, prompt, 40, stop_on_eos=False)
    stats = SpeculativeStats()
    spec = "ngram" if how == "ngram" else ModelDrafter(tiny(seed=7), 64)
    got = generate_local(model, None, prompt, 40, stop_on_eos=False, speculative=spec, stats=stats)
    assert got == plain
    assert stats.tokens == 40 and stats.rounds <= 41
    if how == "ngram":
        assert stats.tokens_per_round > 1.5, stats  # the text repeats: drafts are taken


def test_a_perfect_draft_model_verifies_many_tokens_per_step():
    model = tiny()
    stats = SpeculativeStats()
    got = generate_local(
        model, None, [3, 4], 30, stop_on_eos=False, speculative=ModelDrafter(model, 64), stats=stats
    )
    assert got == generate_local(model, None, [3, 4], 30, stop_on_eos=False)
    assert stats.accepted == stats.drafted and stats.tokens_per_round > 4, stats


def test_speculative_sampling_is_seeded_and_stops_at_eos():
    model = tiny()
    cfg = SamplingConfig(temperature=1.0, seed=5)
    a = generate_local(model, None, [1, 2, 3], 30, cfg, speculative="ngram")
    b = generate_local(model, None, [1, 2, 3], 30, cfg, speculative="ngram")
    assert a == b
    eos = model.config.eos_token_id[0]
    assert eos not in a[:-1]
