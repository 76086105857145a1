"""Pure-torch quantization kernels: the specification of every codec and the CPU path.

Used by kernels.codecs (dispatch) and by the tests that check the Triton kernels against it.

The rules, shared bit for bit with kernels.triton_kernels:
- scale = absmax of the group (row or block) rounded *up* to bfloat16, so |x| / scale <= 1 and the
  scale travels in two bytes; groups with absmax < 2**-120 get scale 0 and decode to zeros.
- linear int8: inv = fp32(127 / scale); code = round_half_even(fp32(x * inv)), clamped to +-127;
  decode = code * fp32(scale / 127).
- dynamic8: inv = fp32(1 / scale); code = number of codebook midpoints < fp32(x * inv);
  decode = codebook[code] * scale.
- A group holding NaN or inf raises QuantizationError (its absmax is not finite).
Work runs in chunks of rows so the float32 scratch stays in cache (a loop over chunks of ~256K
values, never over blocks).
"""

from __future__ import annotations

import torch

from kernels.dynamic_codebook import codebook_midpoints, dynamic_codebook

# Groups whose absmax is below this decode to zero; keeps 127 / scale finite in float32.
TINY_ABSMAX = 2.0**-120
_BF16_MAX_BITS = 0x7F7F0000
_CHUNK_VALUES = 1 << 20


class QuantizationError(ValueError):
    """Input a codec cannot encode: unknown codec or dtype, NaN/inf values, bad shapes."""


def round_up_to_bf16(absmax: torch.Tensor) -> torch.Tensor:
    """Round non-negative finite float32 values up to the next bfloat16 (exact, no overflow)."""
    bits = absmax.to(torch.float32).contiguous().view(torch.int32)
    up = (bits + 0xFFFF) & -65536  # -65536 == 0xFFFF0000 as int32: drop the low mantissa half
    up = torch.clamp(up, max=_BF16_MAX_BITS)
    scale = up.view(torch.float32)
    return torch.where(absmax < TINY_ABSMAX, torch.zeros_like(scale), scale)


def _check_finite(absmax: torch.Tensor) -> None:
    if not bool(torch.isfinite(absmax).all()):
        raise QuantizationError(
            "cannot quantize a tensor holding NaN or inf; use codec 'none', 'fp16' or 'bf16'"
            " to send non-finite values"
        )


def _rows_per_chunk(row_len: int) -> int:
    return max(1, _CHUNK_VALUES // max(1, row_len))


def encode_rows(x2d: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize each row of a 2-D float tensor with its own scale.

    kind: "linear" (int8 codes) or "dynamic" (uint8 codebook indices).
    Returns (codes shaped like x2d, float32 scales [rows]) with scales already bf16-representable.
    """
    rows, length = x2d.shape
    code_dtype = torch.int8 if kind == "linear" else torch.uint8
    codes = torch.empty((rows, length), dtype=code_dtype, device=x2d.device)
    if rows == 0 or length == 0:
        return codes, torch.zeros(rows, dtype=torch.float32, device=x2d.device)
    # max and -min separately: much faster on CPU than abs().amax(), and NaN propagates
    absmax = torch.maximum(x2d.amax(dim=1), -x2d.amin(dim=1)).to(torch.float32)
    _check_finite(absmax)
    scales = round_up_to_bf16(absmax)
    numerator = 127.0 if kind == "linear" else 1.0
    inv = torch.where(scales > 0, numerator / scales, torch.zeros_like(scales))[:, None]
    step = _rows_per_chunk(length)
    buf = torch.empty(min(rows, step) * length, dtype=torch.float32, device=x2d.device)
    midpoints = codebook_midpoints(x2d.device) if kind == "dynamic" else None
    for r0 in range(0, rows, step):
        xc = x2d[r0 : r0 + step]
        y = torch.mul(xc, inv[r0 : r0 + step], out=buf[: xc.numel()].view(xc.shape))
        if kind == "linear":
            y.round_().clamp_(-127.0, 127.0)
            codes[r0 : r0 + xc.shape[0]].copy_(y)
        else:
            codes[r0 : r0 + xc.shape[0]].copy_(torch.searchsorted(midpoints, y, out_int32=True))
    return codes, scales


def decode_rows(
    codes2d: torch.Tensor, scales: torch.Tensor, kind: str, dtype: torch.dtype
) -> torch.Tensor:
    """Inverse of encode_rows: a [rows, length] tensor of `dtype`."""
    rows, length = codes2d.shape
    out = torch.empty((rows, length), dtype=dtype, device=codes2d.device)
    if rows == 0 or length == 0:
        return out
    scales = scales.to(torch.float32)
    table = dynamic_codebook(codes2d.device) if kind == "dynamic" else None
    step = _rows_per_chunk(length)
    for r0 in range(0, rows, step):
        cc = codes2d[r0 : r0 + step]
        sc = scales[r0 : r0 + cc.shape[0], None]
        if kind == "linear":
            y = cc * (sc / 127.0)
        else:
            y = table[cc.to(torch.int32)] * sc
        out[r0 : r0 + cc.shape[0]].copy_(y)
    return out


def encode_blocks(flat: torch.Tensor, block: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 1-D tensor in consecutive blocks of `block` values (the last may be shorter).

    Returns (codes [numel], float32 scales [ceil(numel / block)]).
    """
    n = flat.numel()
    n_full = n // block
    main_codes, main_scales = encode_rows(flat[: n_full * block].view(n_full, block), kind)
    if n_full * block == n:
        return main_codes.view(-1), main_scales
    tail_codes, tail_scales = encode_rows(flat[n_full * block :].view(1, -1), kind)
    return torch.cat([main_codes.view(-1), tail_codes.view(-1)]), torch.cat(
        [main_scales, tail_scales]
    )


def decode_blocks(
    codes: torch.Tensor, scales: torch.Tensor, block: int, kind: str, dtype: torch.dtype
) -> torch.Tensor:
    """Inverse of encode_blocks: a 1-D tensor of `dtype`."""
    n = codes.numel()
    n_full = n // block
    main = decode_rows(codes[: n_full * block].view(n_full, block), scales[:n_full], kind, dtype)
    if n_full * block == n:
        return main.view(-1)
    tail = decode_rows(codes[n_full * block :].view(1, -1), scales[n_full:], kind, dtype)
    return torch.cat([main.view(-1), tail.view(-1)])
