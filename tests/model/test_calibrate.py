"""Calibrated 4-bit blocks (swarm.model.calibrate): GPTQ on text the fp32 model samples itself
gives a model closer to fp32 than round-to-nearest, in the same bytes, the same way every time.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from swarm.model import LlamaModel
from swarm.model.calibrate import (
    CalibrationConfig,
    calibrate_block,
    quantize_calibrated,
    sample_calibration_ids,
)
from swarm.model.fourbit import FourBitLinear
from swarm.model.int8 import Int8Linear, weight_bytes
from swarm.model.llama import rope_cos_sin
from swarm.model.loading import load_model
from swarm.model.quantize import quantize_blocks_as
from tests.model.test_int8 import tiny_config

CONFIG = CalibrationConfig(sequences=8, length=32, int8=(), keep=0.0)  # all 4-bit codes


@pytest.fixture(scope="module")
def fp32_model() -> LlamaModel:
    torch.manual_seed(0)
    return LlamaModel(tiny_config()).eval()


def logits_error(model: LlamaModel, ref: LlamaModel, ids: torch.Tensor) -> float:
    with torch.inference_mode():
        want = ref(ids)
        return ((model(ids) - want).norm() / want.norm()).item()


def test_calibrated_model_is_closer_to_fp32_than_round_to_nearest(fp32_model):
    calibrated = quantize_calibrated(copy.deepcopy(fp32_model), "nf4", CONFIG)
    rtn = quantize_blocks_as(copy.deepcopy(fp32_model), "nf4")
    assert not any(isinstance(m, nn.Linear) for m in calibrated.span.modules())
    assert isinstance(calibrated.client.lm_head, nn.Linear)  # the client stays in float
    assert weight_bytes(calibrated.span) == weight_bytes(rtn.span)
    held_out = sample_calibration_ids(fp32_model, 8, 32, seed=1)  # not the calibration text
    assert logits_error(calibrated, fp32_model, held_out) < logits_error(rtn, fp32_model, held_out)


def test_calibration_is_deterministic(fp32_model):
    a = quantize_calibrated(copy.deepcopy(fp32_model), "fp4", CONFIG)
    b = quantize_calibrated(copy.deepcopy(fp32_model), "fp4", CONFIG)
    for qa, qb in zip(a.span.modules(), b.span.modules(), strict=True):
        if isinstance(qa, FourBitLinear):
            assert qa.kind == "fp4" and torch.equal(qa.packed, qb.packed)


def test_calibrated_checkpoint_model(tiny_model_dir):
    fp32 = load_model(str(tiny_model_dir), progress=False)
    calibrated = quantize_calibrated(copy.deepcopy(fp32), "nf4", CONFIG)
    rtn = load_model(str(tiny_model_dir), quant="nf4-rtn", progress=False)
    held_out = sample_calibration_ids(fp32, 8, 32, seed=1)
    assert logits_error(calibrated, fp32, held_out) < logits_error(rtn, fp32, held_out)


def test_int8_layers_and_kept_columns_are_counted_in_the_bytes(fp32_model):
    config = CalibrationConfig(sequences=4, length=16, int8=("self_attn.v_proj",), keep=0.005)
    mixed = quantize_calibrated(copy.deepcopy(fp32_model), "nf4", config)
    plain = quantize_calibrated(copy.deepcopy(fp32_model), "nf4", CONFIG)
    v = mixed.span.blocks[0].self_attn.v_proj
    assert isinstance(v, Int8Linear)
    assert isinstance(mixed.span.blocks[0].self_attn.k_proj, FourBitLinear)
    int8_extra = len(mixed.span.blocks) * (v.nbytes - plain.span.blocks[0].self_attn.v_proj.nbytes)
    down = [b.mlp.down_proj for b in mixed.span.blocks]  # 256 inputs: 1 column kept in each
    assert all(d.weight.kept == 1 for d in down)
    kept_extra = sum(4 + 2 * d.out_features for d in down)
    assert weight_bytes(mixed.span) == weight_bytes(plain.span) + int8_extra + kept_extra


def test_int8_names_with_a_block_index_pick_that_block_only(fp32_model):
    n = len(fp32_model.span.blocks)
    config = CalibrationConfig(
        sequences=4, length=16, int8=("0:mlp.down_proj", "-1:self_attn.q_proj")
    )
    mixed = quantize_calibrated(copy.deepcopy(fp32_model), "nf4", config)
    kinds = [
        (isinstance(b.mlp.down_proj, Int8Linear), isinstance(b.self_attn.q_proj, Int8Linear))
        for b in mixed.span.blocks
    ]
    assert kinds == [(i == 0, i == n - 1) for i in range(n)]


def test_sampling_with_a_tiny_top_p_is_greedy(fp32_model):
    ids = sample_calibration_ids(fp32_model, 2, 8, seed=3, temperature=0.9, top_p=1e-6)
    with torch.inference_mode():
        for t in range(1, 8):
            assert torch.equal(fp32_model(ids[:, :t])[:, -1].argmax(-1), ids[:, t])


def test_a_block_calibrated_alone_passes_on_the_fp32_output(fp32_model):
    # Non-sequential (loading's way): the next block's inputs are the fp32 model's, so a
    # block's codes depend on the checkpoint alone, whichever blocks a peer holds.
    block = copy.deepcopy(fp32_model.span.blocks[0])
    ids = sample_calibration_ids(fp32_model, 4, 16, seed=2)
    with torch.inference_mode():
        hidden = fp32_model.client.embed(ids).float()
        cos, sin = rope_cos_sin(fp32_model.span.inv_freq, torch.arange(16), hidden.dtype)
        want = fp32_model.span.blocks[0](hidden, cos, sin)
    config = dataclasses.replace(CONFIG, sequential=False)
    n = len(fp32_model.span.blocks)
    got = calibrate_block(block, 0, n, hidden, cos, sin, "nf4", config)
    assert torch.equal(got, want)
    assert isinstance(block.mlp.down_proj, FourBitLinear)
    with torch.inference_mode():  # and the block itself is quantized: its output moved
        assert not torch.equal(block(hidden, cos, sin), want)
