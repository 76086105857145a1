"""Triton kernels for the int8 and dynamic8 codecs: one fused pass per group (absmax, scale,
codes). Used by kernels.codecs for CUDA tensors; tested against kernels.reference on CPU under
TRITON_INTERPRET=1.

Same rules as kernels.reference, bit for bit: scales rounded up to bfloat16 by integer ops,
IEEE division (div_rn) for 127/scale and scale/127, round-half-even via the 1.5 * 2**23 trick,
and FMA contraction disabled so x * inv is rounded before it is rounded to an integer.
A group holding NaN/inf gets an infinite scale, which the host turns into QuantizationError.
"""

from __future__ import annotations

import logging

import torch

from kernels.dynamic_codebook import codebook_midpoints, dynamic_codebook
from kernels.reference import TINY_ABSMAX, QuantizationError

logger = logging.getLogger(__name__)

MAX_FUSED_GROUP = 8192  # longer rows take the two-pass kernel
LONG_ROW_CHUNK = 4096
DEQUANT_TILE = 1024


try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: codecs falls back to the torch reference
    triton = None


def available() -> bool:
    """True if Triton imports; CPU-only installs without it use the torch reference."""
    return triton is not None


if triton is not None:
    # 12582912.0 == 1.5 * 2**23: adding and subtracting it rounds float32 half-to-even

    @triton.jit
    def _scale_from_absmax(absmax, TINY: tl.constexpr):
        bits = absmax.to(tl.int32, bitcast=True)
        up = tl.minimum((bits + 0xFFFF) & -65536, 0x7F7F0000)
        scale = up.to(tl.float32, bitcast=True)
        scale = tl.where(absmax < TINY, 0.0, scale)
        return tl.where(absmax == float("inf"), float("inf"), scale)

    @triton.jit
    def _encode(x, scale, mid_ptr, DYNAMIC: tl.constexpr):
        if DYNAMIC:
            inv = tl.where(scale > 0.0, tl.math.div_rn(1.0, scale), 0.0)
            y = x * inv
            pos = tl.zeros(y.shape, dtype=tl.int32)
            for k in tl.static_range(8):
                cand = pos + (128 >> k)
                m = tl.load(mid_ptr + cand - 1)
                pos = tl.where(m < y, cand, pos)
            return pos.to(tl.uint8)
        else:
            inv = tl.where(scale > 0.0, tl.math.div_rn(127.0, scale), 0.0)
            y = x * inv
            r = (y + 12582912.0) - 12582912.0
            r = tl.minimum(tl.maximum(r, -127.0), 127.0)
            return r.to(tl.int8)

    @triton.jit
    def _absmax(x):
        ax = tl.where(x != x, float("inf"), tl.abs(x))  # NaN -> inf: reported, not hidden
        return tl.max(ax, axis=0)

    @triton.jit
    def _quantize_groups(
        x_ptr, codes_ptr, scales_ptr, mid_ptr, group_len, n_total,
        GROUP: tl.constexpr, DYNAMIC: tl.constexpr, TINY: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0).to(tl.int64)
        lane = tl.arange(0, GROUP)
        offs = pid * group_len + lane
        mask = (lane < group_len) & (offs < n_total)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        scale = _scale_from_absmax(_absmax(x), TINY)
        tl.store(scales_ptr + pid, scale)
        tl.store(codes_ptr + offs, _encode(x, scale, mid_ptr, DYNAMIC), mask=mask)

    @triton.jit
    def _quantize_long_rows(
        x_ptr, codes_ptr, scales_ptr, mid_ptr, group_len,
        CHUNK: tl.constexpr, DYNAMIC: tl.constexpr, TINY: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0).to(tl.int64)
        lane = tl.arange(0, CHUNK)
        base = pid * group_len
        absmax = tl.zeros((), dtype=tl.float32)
        for start in range(0, group_len, CHUNK):
            mask = start + lane < group_len
            x = tl.load(x_ptr + base + start + lane, mask=mask, other=0.0).to(tl.float32)
            absmax = tl.maximum(absmax, _absmax(x))
        scale = _scale_from_absmax(absmax, TINY)
        tl.store(scales_ptr + pid, scale)
        for start in range(0, group_len, CHUNK):
            mask = start + lane < group_len
            x = tl.load(x_ptr + base + start + lane, mask=mask, other=0.0).to(tl.float32)
            codes = _encode(x, scale, mid_ptr, DYNAMIC)
            tl.store(codes_ptr + base + start + lane, codes, mask=mask)

    @triton.jit
    def _dequantize_groups(
        codes_ptr, scales_ptr, table_ptr, out_ptr, group_len, n_total,
        TILE: tl.constexpr, DYNAMIC: tl.constexpr, OUT_BF16: tl.constexpr,
    ):  # fmt: skip
        offs = tl.program_id(0).to(tl.int64) * TILE + tl.arange(0, TILE)
        mask = offs < n_total
        scale = tl.load(scales_ptr + offs // group_len, mask=mask, other=0.0)
        code = tl.load(codes_ptr + offs, mask=mask, other=0)
        if DYNAMIC:
            y = tl.load(table_ptr + code.to(tl.int32), mask=mask, other=0.0) * scale
        else:
            y = code.to(tl.float32) * tl.math.div_rn(scale, 127.0)
        if OUT_BF16:
            # round-to-nearest-even by integer ops: the interpreter's cast truncates
            bits = y.to(tl.int32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
            y = bits.to(tl.float32, bitcast=True)
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def _padded_midpoints(device: torch.device) -> torch.Tensor:
    mid = codebook_midpoints(device)
    return torch.cat([mid, torch.full((1,), float("inf"), device=device)])


def _group_len(shape: tuple[int, ...], spec) -> int:
    if spec.kind == "linear-row":
        return shape[-1] if shape else 1
    return spec.block_size


def quantize(x: torch.Tensor, spec) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes [numel] and float32 scales [groups] of `x` under a parsed codec (see codecs)."""
    flat = x.reshape(-1).contiguous()
    n = flat.numel()
    group_len = _group_len(tuple(x.shape), spec)
    n_groups = spec.num_scales(tuple(x.shape))
    dynamic = spec.kind == "dynamic"
    codes = torch.empty(n, dtype=torch.uint8 if dynamic else torch.int8, device=x.device)
    scales = torch.zeros(n_groups, dtype=torch.float32, device=x.device)
    if n == 0 or n_groups == 0:
        return codes, scales
    mid = _padded_midpoints(x.device)
    group = triton.next_power_of_2(group_len)
    opts = {"DYNAMIC": dynamic, "TINY": TINY_ABSMAX, "enable_fp_fusion": False}
    if group <= MAX_FUSED_GROUP:
        _quantize_groups[(n_groups,)](
            flat, codes, scales, mid, group_len, n, GROUP=group, num_warps=_warps(group), **opts
        )
    else:
        _quantize_long_rows[(n_groups,)](
            flat, codes, scales, mid, group_len, CHUNK=LONG_ROW_CHUNK, num_warps=8, **opts
        )
    if not bool(torch.isfinite(scales).all()):
        raise QuantizationError(
            "cannot quantize a tensor holding NaN or inf; use codec 'none', 'fp16' or 'bf16'"
            " to send non-finite values"
        )
    return codes, scales


def _warps(group: int) -> int:
    return 8 if group >= 2048 else 4


def dequantize(q, spec) -> torch.Tensor:
    """A flat tensor of q.dtype decoded from a QuantizedTensor under a parsed codec."""
    n = q.codes.numel()
    out = torch.empty(n, dtype=q.dtype, device=q.codes.device)
    if n == 0:
        return out
    dynamic = spec.kind == "dynamic"
    scales = q.scales.to(torch.float32).contiguous()
    table = dynamic_codebook(q.codes.device)
    group_len = _group_len(q.shape, spec)
    grid = (-(-n // DEQUANT_TILE),)
    _dequantize_groups[grid](
        q.codes.contiguous(), scales, table, out, group_len, n,
        TILE=DEQUANT_TILE, DYNAMIC=dynamic, OUT_BF16=q.dtype == torch.bfloat16,
        enable_fp_fusion=False,
    )  # fmt: skip
    return out
