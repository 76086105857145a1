"""Tests that the Triton kernels equal the torch reference bit for bit, under TRITON_INTERPRET=1.

Run by pytest (tests/kernels); the check runs in a subprocess so the interpreter flag is set
before triton or kernels.triton_kernels is imported.
"""

import pytest

pytest.importorskip("triton")

CHECK = r"""
import os
assert os.environ["TRITON_INTERPRET"] == "1"
import torch
from kernels import codecs, triton_kernels

torch.manual_seed(0)
cases = []
def case(x, codec):
    cases.append((x, codec))

for codec in [
    "int8-block32", "int8-block512", "dynamic8-block64", "dynamic8-block1024", "int8-row"
]:
    case(torch.randn(3, 70) * 5, codec)                  # last block partial
for dtype in [torch.float16, torch.bfloat16]:
    case((torch.randn(2, 100) * 3).to(dtype), "int8-block64")
    case((torch.randn(2, 100) * 3).to(dtype), "dynamic8-block64")
case(torch.randn(40, 9).t(), "int8-row")                 # non-contiguous
case(torch.zeros(2, 64), "int8-block32")
case(torch.zeros(2, 64), "dynamic8-block32")
case(torch.tensor([4.0]), "dynamic8-block32")
case(torch.tensor([-4.0, 1e-38, 3.4e38]), "int8-block32")
case(torch.empty(0, 5), "int8-block32")
case(torch.randn(2, 9000), "int8-row")                   # long rows: two-pass kernel
case(torch.randn(1, 9000), "dynamic8-block4096")
# values exactly on rounding ties of the linear grid
ties = (torch.arange(-127, 128, dtype=torch.float32) + 0.5).clamp(-127, 127)
case(torch.cat([ties, torch.tensor([127.0])]), "int8-row")
# values exactly on codebook midpoints
from kernels.dynamic_codebook import codebook_midpoints
case(torch.cat([codebook_midpoints(), torch.tensor([1.0])]), "dynamic8-block256")

checked = 0
for x, codec in cases:
    spec = codecs.parse_codec(codec)
    ref = codecs.quantize(x, codec)
    codes, scales = triton_kernels.quantize(x, spec)
    assert torch.equal(codes, ref.codes), (codec, x.shape)
    assert torch.equal(scales.to(torch.bfloat16), ref.scales), (codec, x.shape)
    assert torch.equal(scales, scales.to(torch.bfloat16).float())
    out = triton_kernels.dequantize(ref, spec).reshape(ref.shape)
    expect = codecs.dequantize(ref)
    assert out.dtype == expect.dtype and torch.equal(out, expect), (codec, x.dtype)
    checked += 1

for bad in [float("nan"), float("inf")]:
    x = torch.randn(64)
    x[5] = bad
    for codec in ["int8-block32", "dynamic8-block32"]:
        try:
            triton_kernels.quantize(x, codecs.parse_codec(codec))
        except codecs.QuantizationError:
            checked += 1
        else:
            raise AssertionError("non-finite input accepted")
print("CHECKED", checked)
"""


def test_triton_matches_reference_under_interpreter(fresh_python):
    proc = fresh_python(CHECK, timeout=240, TRITON_INTERPRET="1")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "CHECKED" in proc.stdout
