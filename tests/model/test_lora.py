"""Tests of swarm.model.lora: hooks equal merged weights, QLoRA gradients, dropout, prompts."""

from __future__ import annotations

import copy

import pytest
import torch

from swarm.model import lora
from swarm.model.config import ModelConfig
from swarm.model.int8 import quantize_blocks
from swarm.model.llama import BlockSpan


def config() -> ModelConfig:
    return ModelConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=48,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=64,
    )


def random_adapter(cfg, spec, blocks=(0, 1, 2), std=0.2, seed=0) -> lora.BlockTensors:
    g = torch.Generator().manual_seed(seed)
    shapes = lora.block_shapes(cfg, spec)
    return {b: {n: torch.randn(s, generator=g) * std for n, s in shapes.items()} for b in blocks}


@pytest.fixture
def span() -> BlockSpan:
    torch.manual_seed(0)
    return BlockSpan(config(), 0, 3).eval()


def blocks_of(span: BlockSpan):
    return list(enumerate(span.blocks))


def test_hooks_equal_merged_weights(span):
    spec = lora.AdapterSpec(rank=3, alpha=6.0, targets=tuple(lora.TARGETS))
    tensors = random_adapter(config(), spec)
    x = torch.randn(2, 5, 32)
    with torch.no_grad(), lora.applied(blocks_of(span), spec, tensors):
        got = span(x)
    merged = copy.deepcopy(span)
    with torch.no_grad():
        for b, block in enumerate(merged.blocks):
            for t, path in lora.TARGETS.items():
                linear = block.get_submodule(path)
                a, bb = tensors[b][f"{t}.lora_A"], tensors[b][f"{t}.lora_B"]
                linear.weight += spec.scale * bb @ a
        want = merged(x)
        plain = span(x)  # the hooks are gone after the block
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(plain, want, atol=1e-3)


def test_qlora_gradients_reach_the_input_through_int8(span):
    spec = lora.AdapterSpec(rank=2, alpha=2.0, targets=("q_proj", "down_proj"))
    tensors = random_adapter(config(), spec)
    x = torch.randn(1, 6, 32)
    grads = []
    for s in (span, quantize_blocks(copy.deepcopy(span))):
        params = {
            b: {n: t.clone().requires_grad_(True) for n, t in ts.items()}
            for b, ts in tensors.items()
        }
        xi = x.clone().requires_grad_(True)
        with lora.applied(blocks_of(s), spec, params, grad_through=True):
            s(xi).square().sum().backward()
        grads.append((xi.grad, params[0]["q_proj.lora_A"].grad))
    for fp32, int8 in zip(grads[0], grads[1], strict=True):
        assert int8 is not None
        assert float((int8 - fp32).norm() / fp32.norm()) < 0.05


def test_dense_weight_of_int8_and_of_an_unknown_linear(span):
    q = quantize_blocks(copy.deepcopy(span)).blocks[0].self_attn.q_proj
    w = lora.dense_weight(q)
    assert torch.allclose(w, q.weight.dequantize())

    class Opaque(torch.nn.Module):  # a linear that exposes no weight (an nf4 module, say)
        in_features = 32

        def __init__(self):
            super().__init__()
            self._w = torch.randn(8, 32)

        def forward(self, x):
            return x @ self._w.t()

    m = Opaque()
    assert torch.allclose(lora.dense_weight(m), m._w, atol=1e-6)


def test_dropout_masks_follow_the_seed(span):
    spec = lora.AdapterSpec(rank=2, alpha=2.0, dropout=0.5, targets=("v_proj",))
    tensors = random_adapter(config(), spec, std=1.0)
    x = torch.randn(1, 4, 32)

    def run(seed):
        with torch.no_grad(), lora.applied(blocks_of(span), spec, tensors, seed=seed):
            return span(x)

    assert torch.equal(run(7), run(7))
    assert not torch.allclose(run(7), run(8))
    assert torch.equal(run(0), run(0))  # seed 0: no dropout (inference)


def test_deep_prompts_touch_only_their_positions(span):
    spec = lora.AdapterSpec(pre_seq_len=2)
    tensors = random_adapter(config(), spec, std=1.0)
    x = torch.randn(1, 5, 32)
    with torch.no_grad():
        plain = span.blocks[0](x, *_rope(span, 5))
        with lora.applied(blocks_of(span), spec, tensors):
            hooked = span.blocks[0](x, *_rope(span, 5))
            # a step at position 4 lies past the prompts: nothing is added
            late = span.blocks[0](x[:, :1], *_rope(span, 1, 4), 4)
        plain_late = span.blocks[0](x[:, :1], *_rope(span, 1, 4), 4)
    assert not torch.allclose(hooked[:, :2], plain[:, :2])
    assert torch.equal(late, plain_late)


def _rope(span, t, start=0):
    from swarm.model.llama import rope_cos_sin

    return rope_cos_sin(span.inv_freq, torch.arange(start, start + t), torch.float32)


def test_hash_follows_content_and_spec():
    spec = lora.AdapterSpec(rank=2, alpha=2.0, targets=("q_proj",))
    a = random_adapter(config(), spec)
    b = copy.deepcopy(a)
    assert lora.adapter_hash(spec, a) == lora.adapter_hash(spec, b)
    b[1]["q_proj.lora_B"][0, 0] += 1e-3
    assert lora.adapter_hash(spec, a) != lora.adapter_hash(spec, b)
    other = lora.AdapterSpec(rank=2, alpha=4.0, targets=("q_proj",))
    assert lora.adapter_hash(spec, a) != lora.adapter_hash(other, a)


def test_spec_checks():
    with pytest.raises(ValueError, match="unknown LoRA target"):
        lora.AdapterSpec(rank=2, targets=("x_proj",)).check()
    with pytest.raises(ValueError, match="both a rank"):
        lora.AdapterSpec(rank=2).check()
    assert lora.target_name("gate") == "gate_proj"
