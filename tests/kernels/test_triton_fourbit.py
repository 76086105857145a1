"""Tests that the Triton 4-bit codec equals the torch reference bit for bit (TRITON_INTERPRET=1).

Run by pytest (tests/kernels); in a subprocess so the flag is set before triton is imported.
"""

import pytest

pytest.importorskip("triton")

CHECK = r"""
import os
assert os.environ["TRITON_INTERPRET"] == "1"
import torch
from kernels import fourbit, triton_fourbit

torch.manual_seed(0)
cases = [
    torch.randn(48, 80) * 0.05,                 # blocks straddle rows (80 % 64 != 0)
    torch.randn(7, 13),                         # partial last block, 91 % 4 != 0 (padding)
    torch.randn(3, 64).to(torch.bfloat16),
    torch.zeros(2, 64),
    torch.tensor([[1.0, -1.0, 0.5, 1e-30]]),
]
# values exactly on codebook midpoints (ties go to the lower code)
for kind in fourbit.KINDS:
    mids = fourbit.midpoints(kind)
    cases.append(torch.cat([mids, torch.tensor([1.0])]).view(1, -1))
checked = 0
for x in cases:
    for kind in fourbit.KINDS:
        ref = fourbit.quantize_4bit(x, kind)
        got = triton_fourbit.quantize_4bit(x, kind)
        for name in ("packed", "absmax_codes", "absmax_scales", "absmax_mean"):
            assert torch.equal(getattr(got, name), getattr(ref, name)), (kind, x.shape, name)
        assert torch.equal(triton_fourbit.dequantize_4bit(ref), fourbit.dequantize_4bit(ref))
        checked += 1
x = torch.randn(64)
x[3] = float("nan")
try:
    triton_fourbit.quantize_4bit(x, "nf4")
except fourbit.QuantizationError:
    checked += 1
else:
    raise AssertionError("NaN accepted")
print("CHECKED", checked)
"""


def test_triton_fourbit_matches_reference_under_interpreter(fresh_python):
    proc = fresh_python(CHECK, timeout=240, TRITON_INTERPRET="1")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "CHECKED" in proc.stdout
