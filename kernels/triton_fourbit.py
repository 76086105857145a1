"""Triton kernels of the 4-bit weight codec (NF4, FP4, Int4): block absmax, encode and pack,
decode. Used for CUDA tensors by kernels.fourbit's callers that quantize on the GPU.

Same rules as kernels.fourbit, bit for bit: IEEE division (div_rn) for w / d, codes by counting
midpoints below y, FMA contraction off. The absmax is double-quantized between the two
kernels with the dynamic8 codec (kernels.triton_kernels on CUDA) and torch's elementwise ops;
the one reduction, the mean of the absmax, is summed in float64 (equal to the CPU reference
unless a float32 rounding tie falls between the two summation orders).
Tested against kernels.fourbit under TRITON_INTERPRET=1 (tests/kernels/test_triton_fourbit.py).
"""

from __future__ import annotations

import torch

from kernels import fourbit
from kernels.reference import QuantizationError

ABSMAX_ROWS = 16  # blocks of 64 per program of the absmax kernel
ENCODE_TILE = 1024  # values per program of the encode and decode kernels (a multiple of 4)

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch reference does everything
    triton = None


def available() -> bool:
    """True if Triton imports."""
    return triton is not None


if triton is not None:

    @triton.jit
    def _block_absmax(x_ptr, out_ptr, n_total, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        offs = rows[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
        x = tl.load(x_ptr + offs, mask=offs < n_total, other=0.0).to(tl.float32)
        ax = tl.where(x != x, float("inf"), tl.abs(x))  # NaN -> inf: reported, not hidden
        n_blocks = (n_total + BLOCK - 1) // BLOCK
        tl.store(out_ptr + rows, tl.max(ax, axis=1), mask=rows < n_blocks)

    @triton.jit
    def _code_of(x_ptr, d_ptr, mid_ptr, offs, n_total, BLOCK: tl.constexpr):
        mask = offs < n_total
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        d = tl.load(d_ptr + offs // BLOCK, mask=mask, other=0.0)
        y = tl.where(d != 0.0, tl.math.div_rn(x, tl.where(d != 0.0, d, 1.0)), 0.0)
        code = tl.zeros(y.shape, dtype=tl.int32)
        for j in tl.static_range(15):
            code += (tl.load(mid_ptr + j) < y).to(tl.int32)
        return tl.where(mask, code, 0)  # the tail pads with code 0, as kernels.fourbit.pack

    @triton.jit
    def _encode_pack(
        x_ptr, d_ptr, mid_ptr, packed_ptr, n_total, n_bytes,
        TILE: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        byte = tl.program_id(0).to(tl.int64) * (TILE // 2) + tl.arange(0, TILE // 2)
        lo = _code_of(x_ptr, d_ptr, mid_ptr, 2 * byte, n_total, BLOCK)
        hi = _code_of(x_ptr, d_ptr, mid_ptr, 2 * byte + 1, n_total, BLOCK)
        tl.store(packed_ptr + byte, (lo | (hi << 4)).to(tl.uint8), mask=byte < n_bytes)

    @triton.jit
    def _decode(
        packed_ptr, d_ptr, lut_ptr, out_ptr, n_total, TILE: tl.constexpr, BLOCK: tl.constexpr
    ):
        offs = tl.program_id(0).to(tl.int64) * TILE + tl.arange(0, TILE)
        mask = offs < n_total
        byte = tl.load(packed_ptr + offs // 2, mask=mask, other=0).to(tl.int32)
        code = (byte >> ((offs & 1) * 4).to(tl.int32)) & 15
        w = tl.load(lut_ptr + code, mask=mask, other=0.0) * tl.load(
            d_ptr + offs // BLOCK, mask=mask, other=0.0
        )
        tl.store(out_ptr + offs, w, mask=mask)


def block_absmax(flat: torch.Tensor) -> torch.Tensor:
    """float32 max |x| per block of 64 (as kernels.fourbit.block_absmax; NaN/inf give inf)."""
    n = flat.numel()
    n_blocks = -(-n // fourbit.BLOCK)
    out = torch.empty(n_blocks, dtype=torch.float32, device=flat.device)
    grid = (-(-n_blocks // ABSMAX_ROWS),)
    _block_absmax[grid](flat, out, n, ROWS=ABSMAX_ROWS, BLOCK=fourbit.BLOCK)
    return out


def quantize_4bit(w: torch.Tensor, kind: str = "nf4") -> fourbit.FourBitWeight:
    """kernels.fourbit.quantize_4bit with the block passes in Triton (CUDA, or the interpreter)."""
    from kernels import codecs, triton_kernels

    if kind not in fourbit.KINDS:
        raise QuantizationError(f"unknown 4-bit kind {kind!r}")
    if w.dtype not in (torch.float32, torch.float16, torch.bfloat16) or w.numel() == 0:
        raise QuantizationError("quantize_4bit expects a non-empty float32/float16/bfloat16 tensor")
    flat = w.detach().reshape(-1).contiguous()
    n = flat.numel()
    absmax = block_absmax(flat)
    if not bool(torch.isfinite(absmax).all()):
        raise QuantizationError("cannot quantize a weight holding NaN or inf")
    mean = absmax.to(torch.float64).mean().to(torch.float32)
    spec = codecs.parse_codec(f"dynamic8-block{fourbit.ABSMAX_BLOCK}")
    codes8, scales = triton_kernels.quantize(absmax - mean, spec)
    d = fourbit.dequantize_absmax(codes8, scales, mean)
    n_bytes = 2 * -(-n // 4)
    packed = torch.empty(n_bytes, dtype=torch.uint8, device=w.device)
    mids = fourbit.midpoints(kind, w.device)
    grid = (-(-n_bytes // (ENCODE_TILE // 2)),)
    _encode_pack[grid](
        flat, d, mids, packed, n, n_bytes, TILE=ENCODE_TILE, BLOCK=fourbit.BLOCK,
        enable_fp_fusion=False,
    )  # fmt: skip
    return fourbit.FourBitWeight(packed, codes8, scales, mean, tuple(w.shape), kind)


def dequantize_4bit(q: fourbit.FourBitWeight) -> torch.Tensor:
    """float32 tensor of q.shape: fp32(codebook[code] * d_block), as kernels.fourbit."""
    n = q.numel
    out = torch.empty(n, dtype=torch.float32, device=q.packed.device)
    d = q.absmax()
    lut = fourbit.codebook(q.kind, q.packed.device)
    grid = (-(-n // ENCODE_TILE),)
    _decode[grid](
        q.packed, d, lut, out, n, TILE=ENCODE_TILE, BLOCK=fourbit.BLOCK, enable_fp_fusion=False
    )
    return out.view(q.shape)
