"""4-bit blocks (nf4, fp4, int4): memory per parameter, accuracy against fp32, loading, and
input gradients through the frozen dequantized weights (a fine-tuning path's need).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from swarm.model import Block, LlamaModel, ModelConfig
from swarm.model.fourbit import FourBitLinear
from swarm.model.int8 import Int8Linear, weight_bytes
from swarm.model.quantize import quantize_blocks_as, quantized_params
from tests.model.test_int8 import SMOLLM2_SHAPE, tiny_config


def test_bytes_per_parameter_of_a_smollm2_block():
    block = Block(ModelConfig(**SMOLLM2_SHAPE))
    params = sum(p.numel() for p in block.parameters())
    quantize_blocks_as(block, "nf4")
    assert quantized_params(block) == params
    assert not any(isinstance(m, nn.Linear) for m in block.modules())
    assert weight_bytes(block) / params <= 0.52  # 0.5 + double-quantized absmax + norms


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int4"])
def test_fourbit_model_close_to_fp32(kind):
    torch.manual_seed(0)
    model = LlamaModel(tiny_config()).eval()
    ids = torch.randint(0, 101, (2, 20))
    with torch.no_grad():
        ref = model(ids)
        quantize_blocks_as(model, kind)
        got = model(ids)
    assert isinstance(model.span.blocks[1].self_attn.v_proj, FourBitLinear)
    assert isinstance(model.client.lm_head, nn.Linear)
    assert ((got - ref).norm() / ref.norm()).item() < 0.15


def test_state_dict_and_dtype():
    lin = nn.Linear(64, 16, bias=True)
    q = FourBitLinear.from_linear(lin, "nf4")
    assert set(q.state_dict()) == {"packed", "absmax_codes", "absmax_scales", "absmax_mean", "bias"}
    x = torch.randn(3, 64)
    assert q(x.bfloat16()).dtype == torch.bfloat16
    fresh = FourBitLinear(64, 16, bias=True, kind="nf4")
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh(x), q(x))


@pytest.mark.parametrize("make", [Int8Linear.from_linear, FourBitLinear.from_linear])
def test_input_gradient_through_frozen_weights(make):
    torch.manual_seed(1)
    lin = nn.Linear(64, 32, bias=True)
    q = make(lin)
    x = torch.randn(2, 3, 64, requires_grad=True)
    g = torch.randn(2, 3, 32)
    (q(x) * g).sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    w = q.dequantized_weight(torch.float32)
    (nn.functional.linear(x_ref, w, q.bias) * g).sum().backward()
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-5)
    assert not any(b.requires_grad for b in q.buffers())


@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_block_input_gradient_close_to_dequantized_fp32(quant):
    torch.manual_seed(2)
    config = tiny_config()
    block = Block(config)
    quantized = quantize_blocks_as(Block(config), "none")
    quantized.load_state_dict(block.state_dict())
    quantize_blocks_as(quantized, quant)
    # the fp32 reference holds the dequantized weights, so only the forward's arithmetic differs
    for name, m in quantized.named_modules():
        if hasattr(m, "dequantized_weight"):
            block.get_submodule(name).weight.data = m.dequantized_weight()
    from swarm.model.llama import rope_cos_sin, rope_inv_freq

    cos, sin = rope_cos_sin(rope_inv_freq(config), torch.arange(6), torch.float32)
    x = torch.randn(1, 6, config.hidden_size)
    grads = []
    for b in (block, quantized):
        xi = x.clone().requires_grad_(True)
        b(xi, cos, sin).pow(2).sum().backward()
        grads.append(xi.grad)
    rel = ((grads[0] - grads[1]).norm() / grads[0].norm()).item()
    assert rel < 0.02, rel


def test_load_span_with_nf4(tiny_model_dir):
    from swarm.model.loading import load_span

    fp = load_span(tiny_model_dir, 1, 3, progress=False)
    q = load_span(tiny_model_dir, 1, 3, quant="nf4", progress=False)
    assert isinstance(q.blocks[0].mlp.up_proj, FourBitLinear)
    x = torch.randn(1, 5, fp.config.hidden_size)
    with torch.no_grad():
        a, b = fp(x), q(x)
    assert ((a - b).norm() / a.norm()).item() < 0.1
