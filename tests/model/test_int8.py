"""Int8 blocks: memory per parameter, accuracy against fp32, the outlier path, loading with int8."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kernels
from swarm.model import Block, LlamaModel, ModelConfig
from swarm.model.int8 import Int8Linear, quantize_blocks, weight_bytes
from swarm.model.loading import load_model

SMOLLM2_SHAPE = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_layers=30,
    num_heads=9,
    num_kv_heads=3,
    tie_word_embeddings=True,
)


def tiny_config() -> ModelConfig:
    return ModelConfig(
        vocab_size=101,
        hidden_size=128,
        intermediate_size=256,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=64,
    )


def test_bytes_per_parameter_of_a_smollm2_block():
    torch.manual_seed(0)
    block = Block(ModelConfig(**SMOLLM2_SHAPE))
    params = sum(p.numel() for p in block.parameters())
    assert weight_bytes(block) == 4 * params
    quantize_blocks(block)
    assert not any(isinstance(m, nn.Linear) for m in block.modules())
    per_param = weight_bytes(block) / params
    assert per_param <= 1.1, per_param
    lin = block.self_attn.q_proj
    assert lin.codes.dtype == torch.int8 and lin.nbytes / (576 * 576) <= 1.01


def test_quantize_blocks_leaves_the_head_in_float():
    model = LlamaModel(tiny_config())
    quantize_blocks(model)
    assert isinstance(model.client.lm_head, nn.Linear)
    assert isinstance(model.span.blocks[0].mlp.down_proj, Int8Linear)


def test_int8_model_close_to_fp32():
    torch.manual_seed(0)
    model = LlamaModel(tiny_config()).eval()
    ids = torch.randint(0, 101, (2, 20))
    with torch.no_grad():
        ref = model(ids)
        quantize_blocks(model)
        got = model(ids)
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < 0.02, rel
    # Same decisions almost everywhere.
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.95


def test_outlier_columns_go_through_float():
    torch.manual_seed(0)
    lin = nn.Linear(256, 64, bias=True)
    x = torch.randn(8, 256)
    x[:, 7] *= 60.0  # one outlier feature, as LLM.int8() finds in large models
    x[:, 100] *= 40.0
    ref = lin(x)
    errs = {}
    for threshold in (6.0, 0.0):
        q = Int8Linear.from_linear(lin, threshold=threshold)
        errs[threshold] = ((q(x) - ref).norm() / ref.norm()).item()
    assert errs[6.0] < 0.01, errs
    assert errs[0.0] > 2 * errs[6.0], errs


def test_int8_linear_keeps_dtype_and_shape():
    lin = nn.Linear(32, 16)
    q = Int8Linear.from_linear(lin)
    x = torch.randn(2, 3, 32)
    assert q(x).shape == (2, 3, 16)
    assert q(x.bfloat16()).dtype == torch.bfloat16
    sd = q.state_dict()
    assert set(sd) == {"codes", "scales", "bias"}


def test_kept_kernel_scales_follow_the_weights_they_were_made_from():
    # The CPU kernel's bf16 scales are kept between calls: the same output bit for bit as
    # scales made at the call, and made anew when the layer's scales change (state dict loaded,
    # in or out of inference mode; a new tensor; an in-place write).
    torch.manual_seed(0)
    q, other = (Int8Linear.from_linear(nn.Linear(64, 32, bias=False)) for _ in range(2))
    x = torch.randn(1, 64)

    def fresh(layer):  # what the layer computes with nothing kept
        w = kernels.Int8Weight(layer.codes, layer.scales)
        return kernels.int8_linear(x, w, None, layer.threshold, "weight-only")

    assert torch.equal(q(x), fresh(q))
    q.load_state_dict(other.state_dict())
    assert torch.equal(q(x), fresh(other))
    with torch.inference_mode():
        q.load_state_dict(Int8Linear.from_linear(nn.Linear(64, 32, bias=False)).state_dict())
        assert torch.equal(q(x), fresh(q))
        made_here = Int8Linear.from_linear(nn.Linear(64, 32, bias=False))  # inference tensors
        made_here(x)
        made_here.load_state_dict(other.state_dict())
        assert torch.equal(made_here(x), fresh(other))
    q.scales = q.scales * 2
    assert torch.equal(q(x), fresh(q))
    with torch.no_grad():
        q.scales.mul_(0.5)
    assert torch.equal(q(x), fresh(q))


def test_load_with_int8(tmp_path):
    pytest.importorskip("transformers")
    from tests.model.tiny_checkpoints import make_reference, write_gguf

    ref = make_reference(tied=False, seed=3)
    path = write_gguf(ref, tmp_path / "t.gguf")
    fp = load_model(str(path))
    q = load_model(str(path), quant="int8")
    assert isinstance(q.span.blocks[2].self_attn.k_proj, Int8Linear)
    ids = torch.randint(0, ref.config.vocab_size, (1, 16))
    with torch.no_grad():
        a, b = fp(ids), q(ids)
    assert ((a - b).norm() / a.norm()).item() < 0.03
