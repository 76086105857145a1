"""Tests of the 4-bit weight codec (NF4, FP4, Int4; QLoRA's double quantization) and its matmul.

Run by pytest (tests/kernels); the torch reference and the CPU path.
"""

import pytest
import torch

from kernels import QuantizationError, fourbit


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_codebooks_are_sorted_in_unit_range():
    for kind in fourbit.KINDS:
        table = fourbit.codebook(kind)
        assert table.shape == (16,) and table.dtype == torch.float32
        assert bool((table[1:] >= table[:-1]).all()) and table[-1] == 1.0 and table[0] == -1.0
        assert 0.0 in table.tolist()  # zero weights stay zero
    assert len(set(fourbit.codebook("nf4").tolist())) == 16


def test_pack_and_unpack_are_inverse():
    codes = torch.randint(0, 16, (11,), dtype=torch.uint8)
    packed = fourbit.pack(codes)
    assert packed.numel() == 6  # padded to a multiple of 4 codes
    assert int(packed[0]) == int(codes[0]) | int(codes[1]) << 4
    assert torch.equal(fourbit.unpack(packed, 11), codes)


def test_bytes_per_param_counts_double_quantized_absmax():
    w = torch.randn(1536, 576)
    q = fourbit.quantize_4bit(w, "nf4")
    per_param = q.nbytes / w.numel()
    assert per_param == pytest.approx(0.5 + 1 / 64 + 4 / (64 * 256), abs=1e-4)
    assert per_param <= 0.56
    assert q.absmax_codes.dtype == torch.uint8 and q.absmax_scales.numel() == -(-13824 // 256)


def test_error_order_nf4_fp4_int4_on_normal_weights():
    torch.manual_seed(0)
    w = torch.randn(256, 512) * 0.02
    errs = {k: _rel(fourbit.quantize_4bit(w, k).dequantize(), w) for k in fourbit.KINDS}
    assert errs["nf4"] < errs["fp4"] < errs["int4"] < 0.13, errs


def test_decode_is_close_and_fast_path_is_bit_equal():
    torch.manual_seed(1)
    for shape in [(48, 80), (7, 13), (3, 64)]:
        w = torch.randn(shape)
        for kind in fourbit.KINDS:
            q = fourbit.quantize_4bit(w, kind)
            ref = fourbit.dequantize_4bit(q)
            assert ref.shape == shape and torch.equal(fourbit.fast_dequantize(q), ref)
            # every value within half a codebook gap (largest gap 1/3 for fp4) of its block scale
            d = fourbit._per_value(q.absmax(), 0, w.numel()).view(shape)
            assert bool(((ref - w).abs() <= d.abs() * 0.17 + 1e-6).all()), kind


def test_double_quantized_absmax_is_close():
    torch.manual_seed(2)
    w = torch.randn(64 * 600) * torch.linspace(0.01, 1.0, 64 * 600)
    q = fourbit.quantize_4bit(w, "nf4")
    true = fourbit.block_absmax(w)
    assert _rel(q.absmax(), true) < 0.01
    assert float(q.absmax_mean) == pytest.approx(float(true.mean()), rel=1e-6)


def test_zeros_and_bad_input():
    q = fourbit.quantize_4bit(torch.zeros(4, 64), "nf4")
    assert torch.equal(q.dequantize(), torch.zeros(4, 64))
    w = torch.randn(64)
    w[1] = float("inf")
    with pytest.raises(QuantizationError):
        fourbit.quantize_4bit(w)
    with pytest.raises(QuantizationError):
        fourbit.quantize_4bit(torch.randn(64), "nf3")
    with pytest.raises(QuantizationError):
        fourbit.quantize_4bit(torch.zeros(0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fourbit_linear_equals_dequantized_matmul(dtype):
    torch.manual_seed(3)
    w = torch.randn(96, 128) * 0.05
    bias = torch.randn(96)
    q = fourbit.quantize_4bit(w, "nf4")
    x = torch.randn(2, 5, 128).to(dtype)
    y = fourbit.fourbit_linear(x, q, bias)
    ref = x.float() @ q.dequantize().t() + bias
    assert y.dtype == dtype and y.shape == (2, 5, 96)
    assert _rel(y, ref) < (1e-6 if dtype == torch.float32 else 1e-2)
    with pytest.raises(QuantizationError):
        fourbit.fourbit_linear(torch.randn(3, 100), q)


def test_absmax_decode_equals_the_dynamic8_codec():
    from kernels import reference

    torch.manual_seed(4)
    a = torch.rand(600) * 0.1  # 600 blocks: two full groups of 256 and a tail
    codes, scales, mean = fourbit.quantize_absmax(a)
    ref = reference.decode_blocks(codes, scales, fourbit.ABSMAX_BLOCK, "dynamic", torch.float32)
    assert torch.equal(fourbit.dequantize_absmax(codes, scales, mean), ref + mean)
