"""Triton matmuls that dequantize weights inside their tiles: x @ W^T with W as row-wise int8
codes or packed 4-bit codes; the float weight never exists in memory. The CUDA path of
kernels.int8_matmul (weight-only, small batches) and kernels.fourbit.fourbit_linear.

Accumulates in float32; float32 inputs multiply in IEEE float32 (no TF32), half inputs in their
own dtype. Equal to x @ reference_dequantize(W)^T up to summation order (tolerance, not bits).
Tested under TRITON_INTERPRET=1 (tests/kernels/test_triton_dequant_mm.py).
"""

from __future__ import annotations

import torch

from kernels import fourbit

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

TILE_M, TILE_N, TILE_K = 16, 64, 64


def available() -> bool:
    """True if Triton imports."""
    return triton is not None


if triton is not None:

    @triton.jit
    def _dequant_mm(
        x_ptr, out_ptr, codes_ptr, scale_ptr, lut_ptr, m, n, k,
        stride_xm, stride_om,
        FOURBIT: tl.constexpr, IEEE: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        rm = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
        rn = tl.program_id(1).to(tl.int64) * BN + tl.arange(0, BN)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, k, BK):
            rk = k0 + tl.arange(0, BK)
            a_mask = (rm[:, None] < m) & (rk[None, :] < k)
            a = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=a_mask, other=0.0)
            w_mask = (rk[:, None] < k) & (rn[None, :] < n)
            flat = rn[None, :] * k + rk[:, None]  # [BK, BN]: element (k, n) of W^T
            if FOURBIT:
                byte = tl.load(codes_ptr + flat // 2, mask=w_mask, other=0).to(tl.int32)
                code = (byte >> ((flat & 1) * 4).to(tl.int32)) & 15
                scale = tl.load(scale_ptr + flat // BLOCK, mask=w_mask, other=0.0)
                w = tl.load(lut_ptr + code, mask=w_mask, other=0.0) * scale
            else:
                code = tl.load(codes_ptr + flat, mask=w_mask, other=0).to(tl.float32)
                w = code * tl.load(scale_ptr + rn, mask=rn < n, other=0.0)[None, :]
            if IEEE:
                acc += tl.dot(a.to(tl.float32), w, input_precision="ieee")
            else:
                acc += tl.dot(a, w.to(a.dtype))
        o_mask = (rm[:, None] < m) & (rn[None, :] < n)
        tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], acc, mask=o_mask)


def _launch(x2d, codes, scales, lut, n: int, fourbit_codes: bool) -> torch.Tensor:
    x2d = x2d.contiguous()
    m, k = x2d.shape
    out = torch.empty((m, n), dtype=torch.float32, device=x2d.device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_()
    grid = (triton.cdiv(m, TILE_M), triton.cdiv(n, TILE_N))
    _dequant_mm[grid](
        x2d, out, codes, scales, lut, m, n, k, x2d.stride(0), out.stride(0),
        FOURBIT=fourbit_codes, IEEE=x2d.dtype == torch.float32,
        BM=TILE_M, BN=TILE_N, BK=TILE_K, BLOCK=fourbit.BLOCK,
    )  # fmt: skip
    return out


def int8_dequant_mm(x2d: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 [M, N] = x2d [M, K] @ (codes [N, K] * scales[:, None] / 127)^T."""
    row_scale = (scales.to(torch.float32) / 127.0).contiguous()
    return _launch(x2d, codes.contiguous(), row_scale, row_scale, codes.shape[0], False)


def fourbit_dequant_mm(x2d: torch.Tensor, q: fourbit.FourBitWeight) -> torch.Tensor:
    """float32 [M, N] = x2d [M, K] @ dequantize(q)^T for a [N, K] 4-bit weight."""
    d = q.absmax().contiguous()
    lut = fourbit.codebook(q.kind, x2d.device)
    return _launch(x2d, q.packed, d, lut, q.shape[0], True)
