"""Tests of the Triton dequantize-in-the-tile matmuls (int8 and 4-bit weights) under
TRITON_INTERPRET=1, against x @ reference_dequantize(W)^T. Run by pytest (tests/kernels).
"""

import pytest

pytest.importorskip("triton")

CHECK = r"""
import os
assert os.environ["TRITON_INTERPRET"] == "1"
import torch
import kernels
from kernels import fourbit, triton_dequant_mm

torch.manual_seed(0)
checked = 0
for m, k, n in [(1, 80, 48), (5, 128, 70), (17, 64, 16)]:
    x = torch.randn(m, k)
    w = torch.randn(n, k) * 0.05
    q8 = kernels.quantize_weight(w)
    ref = x @ q8.dequantize().t()
    got = triton_dequant_mm.int8_dequant_mm(x, q8.codes, q8.scales)
    assert got.shape == (m, n) and torch.allclose(got, ref, rtol=1e-5, atol=1e-5), (m, k, n)
    for kind in fourbit.KINDS:
        q4 = fourbit.quantize_4bit(w, kind)
        ref = x @ fourbit.dequantize_4bit(q4).t()
        got = triton_dequant_mm.fourbit_dequant_mm(x, q4)
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5), (kind, m, k, n)
        checked += 1
print("CHECKED", checked)
"""


def test_dequant_matmuls_match_reference_under_interpreter(fresh_python):
    proc = fresh_python(CHECK, timeout=240, TRITON_INTERPRET="1")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "CHECKED" in proc.stdout
