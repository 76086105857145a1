"""Sampling semantics (greedy, top-k, top-p, repetition penalty, seeds) and local generation."""

from __future__ import annotations

import pytest
import torch

from swarm.errors import BadRequest
from swarm.generation import (
    SamplingConfig,
    apply_repetition_penalty,
    filter_top_k_top_p,
    generate_local,
    sample_next,
)
from swarm.model import LlamaModel, ModelConfig


def tiny_model(eos: int = 2) -> LlamaModel:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=32,
        eos_token_id=[eos],
    )
    return LlamaModel(cfg).eval()


def test_greedy_is_argmax():
    logits = torch.randn(3, 20)
    assert torch.equal(sample_next(logits, None, SamplingConfig()), logits.argmax(-1))


def test_repetition_penalty_semantics():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    out = apply_repetition_penalty(logits, torch.tensor([[0, 1]]), 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0, 0.5]]
    # With the penalty, greedy moves off the repeated token.
    cfg = SamplingConfig(repetition_penalty=3.0)
    assert sample_next(logits, [[0]], cfg).item() == 2


def test_top_k_and_top_p_masks():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    k2 = filter_top_k_top_p(logits, 2, 1.0)
    assert torch.isinf(k2[0, 2:]).all() and torch.isfinite(k2[0, :2]).all()
    p = filter_top_k_top_p(logits, 0, 0.7)  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7: keep two
    assert torch.isfinite(p[0, :2]).all() and torch.isinf(p[0, 2:]).all()
    p = filter_top_k_top_p(logits, 0, 0.01)  # the best token always stays
    assert torch.isfinite(p[0, 0]) and torch.isinf(p[0, 1:]).all()


def test_top_k_one_is_greedy_even_when_sampling():
    logits = torch.randn(4, 30)
    cfg = SamplingConfig(temperature=1.5, top_k=1, seed=0)
    assert torch.equal(sample_next(logits, None, cfg, cfg.make_generator()), logits.argmax(-1))


def test_seeded_sampling_is_reproducible():
    logits = torch.randn(2, 1000)
    cfg = SamplingConfig(temperature=1.0, seed=123)
    a = [sample_next(logits, None, cfg, g).tolist() for g in [cfg.make_generator()] * 20]
    b = [sample_next(logits, None, cfg, g).tolist() for g in [cfg.make_generator()] * 20]
    assert a == b
    other = SamplingConfig(temperature=1.0, seed=124)
    c = [sample_next(logits, None, other, g).tolist() for g in [other.make_generator()] * 20]
    assert a != c


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.7, 0.2, 0.1])
    logits = probs.log().repeat(4000, 1)
    cfg = SamplingConfig(temperature=1.0, seed=0)
    ids = sample_next(logits, None, cfg, cfg.make_generator())
    freq = torch.bincount(ids, minlength=3).float() / len(ids)
    assert torch.allclose(freq, probs, atol=0.03)


@pytest.mark.parametrize(
    "kwargs", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-1)]
)
def test_bad_sampling_config(kwargs):
    with pytest.raises(BadRequest):
        SamplingConfig(**kwargs)


def test_generate_local_matches_uncached_greedy():
    model = tiny_model(eos=-1)
    prompt = [5, 7, 9, 11]
    got = generate_local(model, None, prompt, 10, SamplingConfig())
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(10):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], 1)
    assert got == ids[0, len(prompt) :].tolist()


def test_generate_local_streams_and_stops_on_eos():
    model = tiny_model(eos=-1)
    first = generate_local(model, None, [1, 2, 3], 8)
    eos = first[3]
    model.config.eos_token_id = [eos]
    seen = []
    out = generate_local(model, None, [1, 2, 3], 8, on_token=seen.append)
    assert out == seen == first[: first.index(eos) + 1]
    assert generate_local(model, None, [1, 2, 3], 8, stop_on_eos=False) == first


def test_generate_local_seeded_sampling_repeats():
    model = tiny_model()
    cfg = SamplingConfig(temperature=1.0, top_p=0.9, seed=7)
    a = generate_local(model, None, [3, 4], 12, cfg, stop_on_eos=False)
    b = generate_local(model, None, [3, 4], 12, cfg, stop_on_eos=False)
    assert a == b


def test_prompt_longer_than_context():
    model = tiny_model()
    with pytest.raises(BadRequest, match="context"):
        generate_local(model, None, list(range(1, 33)), 4)
    with pytest.raises(BadRequest, match="empty"):
        generate_local(model, None, [], 4)
    # A prompt that fits stops at the context's end.
    assert len(generate_local(model, None, [1] * 30, 10, stop_on_eos=False)) == 2
