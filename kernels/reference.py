"""Pure-torch quantization kernels: the specification of every codec and the CPU path.

Used by kernels.codecs (dispatch) and by the tests that check the Triton kernels against it.

The rules, shared bit for bit with kernels.triton_kernels:
- scale = absmax of the group (row or block) rounded *up* to bfloat16, so |x| / scale <= 1 and the
  scale travels in two bytes; groups with absmax < 2**-120 get scale 0 and decode to zeros.
- linear int8: inv = fp32(127 / scale); code = round_half_even(fp32(x * inv)), clamped to +-127;
  decode = code * fp32(scale / 127).
- dynamic8: inv = fp32(1 / scale); code = number of codebook midpoints < fp32(x * inv), found
  by one lookup in a 65536-entry table (dynamic_codebook.bucket_table) rather than a search;
  decode = codebook[code] * scale.
- A group holding NaN or inf raises QuantizationError (its absmax is not finite).
Work runs in chunks of rows (~4M values, never a loop over blocks) so the scratch stays bounded.
"""

from __future__ import annotations

import torch

from kernels.dynamic_codebook import bucket_table, dynamic_codebook

# Groups whose absmax is below this decode to zero; keeps 127 / scale finite in float32.
TINY_ABSMAX = 2.0**-120
_BF16_MAX_BITS = 0x7F7F0000
_CHUNK_VALUES = 1 << 22  # few big chunks: each torch op is an OpenMP region, costly when loaded


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
    # one pass for both extremes: faster on CPU than abs().amax(), and NaN propagates
    lo, hi = torch.aminmax(x2d, dim=1)
    absmax = torch.maximum(hi, -lo).to(torch.float32)
    _check_finite(absmax)
    scales = round_up_to_bf16(absmax)
    numerator = 127.0 if kind == "linear" else 1.0
    inv = torch.where(scales > 0, numerator / scales, torch.zeros_like(scales))[:, None]
    step = _rows_per_chunk(length)
    scratch = min(rows, step) * length
    buf = torch.empty(scratch, dtype=torch.float32, device=x2d.device)
    if kind == "dynamic":
        table = bucket_table(x2d.device)
        keys = torch.empty(scratch, dtype=torch.int32, device=x2d.device)
        lows = torch.empty(scratch, dtype=torch.int32, device=x2d.device)
    for r0 in range(0, rows, step):
        xc = x2d[r0 : r0 + step]
        n = xc.numel()
        y = torch.mul(xc, inv[r0 : r0 + step], out=buf[:n].view(xc.shape))
        out = codes[r0 : r0 + xc.shape[0]].view(-1)
        if kind == "linear":
            # no clamp: |x| <= scale, so |fp32(x * fp32(127 / scale))| < 127.5 rounds to <= 127
            out.copy_(y.round_().view(-1))
        else:
            _dynamic_codes(y.view(-1), table, keys[:n], lows[:n], out)
    return codes, scales


def _dynamic_codes(
    y: torch.Tensor, table: torch.Tensor, keys: torch.Tensor, lows: torch.Tensor, out: torch.Tensor
) -> None:
    """Codebook codes of normalized values y (1-D float32, overwritten) into out (uint8).

    Equal to counting midpoints < y, via the 65536-entry bucket table (see bucket_table).
    """
    bits = y.view(torch.int32)
    torch.bitwise_right_shift(bits, 16, out=keys).bitwise_and_(0xFFFF)
    torch.bitwise_right_shift(bits, 31, out=lows).bitwise_xor_(bits).bitwise_and_(0xFFFF)
    torch.index_select(table, 0, keys, out=bits)  # y is spent: reuse its buffer
    out.copy_(bits.add_(lows).bitwise_right_shift_(16))


def decode_rows(
    codes2d: torch.Tensor, scales: torch.Tensor, kind: str, dtype: torch.dtype
) -> torch.Tensor:
    """Inverse of encode_rows: a [rows, length] tensor of `dtype`."""
    rows, length = codes2d.shape
    out = torch.empty((rows, length), dtype=dtype, device=codes2d.device)
    if rows == 0 or length == 0:
        return out
    scales = scales.to(torch.float32)
    if kind == "linear":
        scales = scales / 127.0
    table = dynamic_codebook(codes2d.device) if kind == "dynamic" else None
    step = _rows_per_chunk(length)
    scratch = min(rows, step) * length
    # float32 results go straight to out; half types are computed in float32, then rounded once
    buf = None if dtype == torch.float32 else torch.empty(scratch, device=codes2d.device)
    index = (
        torch.empty(scratch, dtype=torch.int32, device=codes2d.device)
        if table is not None
        else None
    )
    for r0 in range(0, rows, step):
        cc = codes2d[r0 : r0 + step]
        n, shape = cc.numel(), cc.shape
        sc = scales[r0 : r0 + shape[0], None]
        dest = out[r0 : r0 + shape[0]] if buf is None else buf[:n].view(shape)
        if kind == "linear":
            torch.mul(cc, sc, out=dest)
        else:
            idx = index[:n].view(shape)
            idx.copy_(cc)
            torch.index_select(table, 0, idx.view(-1), out=dest.view(-1))
            dest.mul_(sc)
        if buf is not None:
            out[r0 : r0 + shape[0]].copy_(dest)
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
