"""GPTQ for 4-bit block weights (kernels.gptq): less output error than round-to-nearest on
correlated inputs, in the very format (and bytes) the ordinary decoders read.
"""

from __future__ import annotations

import pytest
import torch

from kernels.fourbit import dequantize_4bit, fast_dequantize, fourbit_linear, quantize_4bit
from kernels.gptq import add_to_hessian, gptq_quantize_4bit, search_block_scales
from kernels.reference import QuantizationError


def correlated_inputs(tokens: int, n: int, seed: int) -> torch.Tensor:
    """Inputs with a low-rank shared part and a few outlier channels, as LLM activations have."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(12, n, generator=torch.Generator().manual_seed(99))  # same for all seeds
    x = torch.randn(tokens, 12, generator=g) @ mix + 0.3 * torch.randn(tokens, n, generator=g)
    x[:, :3] *= 8.0
    return x


def output_error(x: torch.Tensor, w: torch.Tensor, q: torch.Tensor) -> float:
    return ((x @ (q - w).t()).norm() / (x @ w.t()).norm()).item()


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int4"])
def test_gptq_beats_round_to_nearest_on_held_out_inputs(kind):
    n, out = 192, 96
    w = torch.randn(out, n, generator=torch.Generator().manual_seed(1)) * 0.02
    h = add_to_hessian(torch.zeros(n, n), correlated_inputs(1024, n, seed=2))
    held_out = correlated_inputs(512, n, seed=3)
    (g,) = gptq_quantize_4bit([w], h, kind, damp=0.1)
    rtn = quantize_4bit(w, kind).dequantize()
    assert output_error(held_out, w, g.dequantize()) < 0.7 * output_error(held_out, w, rtn)


def test_gptq_weights_are_the_ordinary_format():
    n = 128
    ws = [torch.randn(o, n, generator=torch.Generator().manual_seed(o)) for o in (64, 32, 32)]
    h = add_to_hessian(torch.zeros(n, n), correlated_inputs(256, n, seed=0))
    qs = gptq_quantize_4bit(ws, h, "nf4")
    for w, q in zip(ws, qs, strict=True):
        rtn = quantize_4bit(w, "nf4")
        assert q.shape == tuple(w.shape) and q.nbytes == rtn.nbytes  # same bytes per param
        assert torch.equal(fast_dequantize(q), dequantize_4bit(q))
        x = torch.randn(3, n)
        torch.testing.assert_close(fourbit_linear(x, q), x @ q.dequantize().t())
        # codes are not round-to-nearest ones, yet stay close to the weight
        assert not torch.equal(q.packed, rtn.packed)
        assert ((q.dequantize() - w).norm() / w.norm()).item() < 0.3


def test_blocks_that_span_two_rows():
    w = torch.randn(10, 96, generator=torch.Generator().manual_seed(0))  # 96 = 1.5 blocks
    h = add_to_hessian(torch.zeros(96, 96), correlated_inputs(400, 96, seed=1))
    (q,) = gptq_quantize_4bit([w], h, "nf4", damp=0.1)
    x = correlated_inputs(200, 96, seed=5)
    assert output_error(x, w, q.dequantize()) < output_error(x, w, quantize_4bit(w).dequantize())


def test_scale_search_never_loses_to_plain_absmax():
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(0))
    hd = torch.rand(128, generator=torch.Generator().manual_seed(1)) + 0.1
    best = search_block_scales(w, hd, "nf4")
    plain = search_block_scales(w, hd, "nf4", grid=(1.0,))
    assert torch.equal(plain, w.reshape(-1, 64).abs().amax(dim=1))
    assert bool((best <= plain).all()) and bool((best < plain).any())


def test_bad_inputs_raise_quantization_error():
    w = torch.randn(8, 64)
    with pytest.raises(QuantizationError, match="Hessian"):
        gptq_quantize_4bit([w], torch.eye(32))
    with pytest.raises(QuantizationError, match="NaN"):
        gptq_quantize_4bit([torch.full((8, 64), float("nan"))], torch.eye(64))
    with pytest.raises(QuantizationError, match="kind"):
        gptq_quantize_4bit([w], torch.eye(64), "int3")


def test_unseen_inputs_get_finite_codes():
    w = torch.randn(8, 64)
    h = torch.zeros(64, 64)
    h[:32, :32] = add_to_hessian(torch.zeros(32, 32), torch.randn(100, 32))
    (q,) = gptq_quantize_4bit([w], h)
    assert bool(torch.isfinite(q.dequantize()).all())


def test_kept_columns_decode_exactly_and_are_counted():
    n, out = 128, 48
    w = torch.randn(out, n, generator=torch.Generator().manual_seed(4)) * 0.02
    x = correlated_inputs(600, n, seed=6)
    h = add_to_hessian(torch.zeros(n, n), x)
    (plain,) = gptq_quantize_4bit([w], h, "nf4", damp=0.1)
    (q,) = gptq_quantize_4bit([w], h, "nf4", damp=0.1, keep=0.05)
    assert q.kept == 6 and q.kept_values.dtype == torch.float16
    assert set(q.kept_cols.tolist()) >= {0, 1, 2}  # the outlier input channels
    cols = q.kept_cols.long()
    exact = w[:, cols].to(torch.float16).to(torch.float32)
    assert torch.equal(dequantize_4bit(q)[:, cols], exact)
    assert torch.equal(fast_dequantize(q), dequantize_4bit(q))
    assert q.nbytes == plain.nbytes + 6 * (4 + 2 * out)
    x_test = correlated_inputs(300, n, seed=7)
    torch.testing.assert_close(fourbit_linear(x_test, q), x_test @ q.dequantize().t())
    assert output_error(x_test, w, q.dequantize()) < output_error(x_test, w, plain.dequantize())


@pytest.mark.parametrize("keep", [0.0, 0.02])
def test_refitted_scales_move_the_outputs_less_in_the_same_bytes(keep):
    n, out = 256, 96
    w = torch.randn(out, n, generator=torch.Generator().manual_seed(4)) * 0.02
    x = correlated_inputs(2048, n, seed=6)
    h = add_to_hessian(torch.zeros(n, n), x)
    (plain,) = gptq_quantize_4bit([w], h, "nf4", damp=0.1, keep=keep)
    (refit,) = gptq_quantize_4bit([w], h, "nf4", damp=0.1, keep=keep, refine=True)
    assert torch.equal(plain.packed, refit.packed) and refit.nbytes == plain.nbytes
    assert not torch.equal(plain.absmax_codes, refit.absmax_codes)
    assert output_error(x, w, refit.dequantize()) < 0.99 * output_error(x, w, plain.dequantize())
    held_out = correlated_inputs(512, n, seed=7)  # not a fit to the calibration inputs alone
    assert output_error(held_out, w, refit.dequantize()) < output_error(
        held_out, w, plain.dequantize()
    )
