"""Tests of the LLM.int8() pieces: row-wise int8 weights, outlier split, int8 matmul.

Run by pytest (tests/kernels); CPU path (torch._int_mm).
"""

import pytest
import torch

import kernels


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_quantize_weight_fields_and_bound():
    torch.manual_seed(0)
    w = torch.randn(48, 80)
    q = kernels.quantize_weight(w)
    assert q.codes.dtype == torch.int8 and q.codes.shape == (48, 80)
    assert q.scales.dtype == torch.float32 and q.scales.shape == (48,)
    assert q.shape == (48, 80) and q.nbytes == 48 * 80 + 4 * 48
    assert torch.equal(q.scales, w.abs().amax(1))
    err = (q.dequantize() - w).abs()
    assert bool((err <= q.scales[:, None] / 127 * 0.5 + 1e-6).all())


def test_quantize_weight_rejects_bad_input():
    with pytest.raises(kernels.QuantizationError):
        kernels.quantize_weight(torch.randn(3, 4, 5))
    w = torch.randn(4, 4)
    w[0, 0] = float("nan")
    with pytest.raises(kernels.QuantizationError):
        kernels.quantize_weight(w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_int8_linear_close_to_float(dtype):
    torch.manual_seed(1)
    w = torch.randn(96, 128) / 10
    bias = torch.randn(96)
    x = torch.randn(2, 5, 128).to(dtype)
    y = kernels.int8_linear(x, kernels.quantize_weight(w), bias)
    ref = x.float() @ w.t() + bias
    assert y.dtype == dtype and y.shape == (2, 5, 96)
    assert _rel(y, ref) < 0.02


def test_outlier_columns_go_through_float():
    torch.manual_seed(2)
    w = torch.randn(64, 256) / 16
    x = torch.randn(33, 256)
    x[:, [3, 100, 200]] *= 40  # emergent-feature-like columns
    wq = kernels.quantize_weight(w)
    ref = x @ wq.dequantize().t()  # isolates activation quantization error
    split = _rel(kernels.int8_linear(x, wq), ref)
    plain = _rel(kernels.int8_linear(x, wq, threshold=0.0), ref)
    assert split < 0.01 and plain > 3 * split
    codes, scales, cols = kernels.quantize_rows_with_outliers(x, 6.0)
    assert set(cols.tolist()) >= {3, 100, 200}
    assert bool((codes[:, cols] == 0).all())


def test_int8_linear_exact_on_integer_grid():
    # values on the int8 grid with absmax 127 quantize exactly, so the result is exact
    torch.manual_seed(3)
    x = torch.randint(-127, 128, (20, 64)).float()
    x[:, 0] = 127.0
    w = torch.randint(-127, 128, (16, 64)).float()
    w[:, 0] = 127.0
    y = kernels.int8_linear(x, kernels.quantize_weight(w), threshold=0.0)
    assert torch.equal(y, x @ w.t())


def test_int8_linear_edge_shapes():
    wq = kernels.quantize_weight(torch.randn(8, 12))
    assert kernels.int8_linear(torch.randn(0, 12), wq).shape == (0, 8)
    assert kernels.int8_linear(torch.randn(1, 12), wq).shape == (1, 8)
    assert kernels.int8_linear(torch.zeros(3, 12), wq).abs().sum() == 0
    with pytest.raises(kernels.QuantizationError):
        kernels.int8_linear(torch.randn(3, 11), wq)


def test_int8_linear_no_grad():
    x = torch.randn(4, 12, requires_grad=True)
    y = kernels.int8_linear(x, kernels.quantize_weight(torch.randn(8, 12)))
    assert not y.requires_grad


def test_int8_mm_matches_integer_matmul():
    torch.manual_seed(4)
    a = torch.randint(-127, 128, (5, 13), dtype=torch.int8)
    b = torch.randint(-127, 128, (7, 13), dtype=torch.int8)
    assert torch.equal(kernels.int8_mm(a, b), (a.int() @ b.int().t()).int())


def test_paths_agree_with_the_dequantized_matmul():
    torch.manual_seed(3)
    w = torch.randn(64, 128) / 10
    wq = kernels.quantize_weight(w)
    for m in (1, 3, 9):
        x = torch.randn(m, 128)
        ref = x @ wq.dequantize().t()
        wo = kernels.int8_linear(x, wq, path="weight-only")
        i8 = kernels.int8_linear(x, wq, path="int8")
        # weight-only: bf16 activations and output (~0.3%); int8: per-token codes (~1%)
        assert _rel(wo, ref) < 0.005 and _rel(i8, ref) < 0.02
        auto = kernels.int8_linear(x, wq)
        expect = wo if kernels.choose_path(m, wq, x.device) == "weight-only" else i8
        assert torch.equal(auto, expect)


def test_choose_path_by_rows_and_shape():
    wq = kernels.quantize_weight(torch.randn(32, 64))
    cpu = torch.device("cpu")
    limit = kernels.weight_only_max_tokens(cpu)
    assert kernels.choose_path(1, wq, cpu) == "weight-only"
    assert kernels.choose_path(limit, wq, cpu) == "weight-only"
    assert kernels.choose_path(limit + 1, wq, cpu) == "int8"
    odd = kernels.quantize_weight(torch.randn(32, 40))  # K % 16 != 0: the CPU kernel would crash
    assert kernels.choose_path(1, odd, cpu) == "int8"
    x = torch.randn(2, 40)
    y = kernels.int8_linear(x, odd, path="weight-only")  # falls back, no crash
    assert _rel(y, x @ odd.dequantize().t()) < 0.02


def test_non_finite_activations_are_rejected():
    wq = kernels.quantize_weight(torch.randn(8, 32))
    x = torch.randn(20, 32)
    x[3, 4] = float("nan")
    with pytest.raises(kernels.QuantizationError):
        kernels.int8_linear(x, wq, path="int8")
    with pytest.raises(kernels.QuantizationError):
        kernels.int8_linear(torch.randn(2, 32), wq, path="fastest")
