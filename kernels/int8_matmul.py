"""LLM.int8() pieces: row-wise int8 weights, per-token activation quantization with outlier
columns split off, and the int8 x int8 -> int32 matmul with dequantization. Used by swarm's model.

Inference only: every function runs under torch.no_grad() and returns tensors without history.
Weights keep float32 scales (exact absmax, no bf16 rounding: they never cross the wire per call).
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from kernels.reference import QuantizationError

logger = logging.getLogger(__name__)

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclasses.dataclass
class Int8Weight:
    """A [out, in] weight as int8 codes with one absmax scale per output row.

    codes: int8 [out, in]; scales: float32 [out], row absmax; w ~= codes * scales[:, None] / 127.
    """

    codes: torch.Tensor
    scales: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    @property
    def nbytes(self) -> int:
        return self.codes.numel() + 4 * self.scales.numel()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight this stands for, [out, in] of `dtype`."""
        return (self.codes * (self.scales[:, None] / 127.0)).to(dtype)

    def to(self, device: torch.device | str) -> Int8Weight:
        return Int8Weight(self.codes.to(device), self.scales.to(device))


def _rowwise_int8(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmax int8 per row with exact float32 scales; zero rows get scale 0."""
    absmax = torch.maximum(x2d.amax(dim=1), -x2d.amin(dim=1)).to(torch.float32)
    if not bool(torch.isfinite(absmax).all()):
        raise QuantizationError("cannot quantize a tensor holding NaN or inf")
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    y = x2d.to(torch.float32) * (127.0 / safe)[:, None]
    codes = y.round_().clamp_(-127.0, 127.0).to(torch.int8)
    return codes, absmax


def quantize_weight(w: torch.Tensor) -> Int8Weight:
    """Quantize a [out, in] float weight to int8 with absmax per output row."""
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.dtype not in _FLOAT_DTYPES:
        raise QuantizationError("quantize_weight expects a 2-D float32/float16/bfloat16 tensor")
    with torch.no_grad():
        codes, scales = _rowwise_int8(w.detach())
    return Int8Weight(codes.contiguous(), scales)


def quantize_rows_with_outliers(
    x2d: torch.Tensor, threshold: float = 6.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token int8 quantization of [tokens, features] activations, outlier columns split off.

    Columns where any |x| >= threshold (threshold <= 0 disables) are zeroed before quantizing.
    Returns (int8 codes [tokens, features], float32 row absmax [tokens], int64 outlier columns).
    """
    if x2d.dim() != 2 or x2d.dtype not in _FLOAT_DTYPES:
        raise QuantizationError("expected a 2-D float32/float16/bfloat16 activation matrix")
    with torch.no_grad():
        x2d = x2d.detach()
        if threshold > 0 and x2d.numel():
            outlier_cols = torch.nonzero((x2d.abs() >= threshold).any(dim=0)).view(-1)
        else:
            outlier_cols = torch.zeros(0, dtype=torch.long, device=x2d.device)
        if outlier_cols.numel():
            x2d = x2d.index_fill(1, outlier_cols, 0.0)
        codes, scales = _rowwise_int8(x2d)
    return codes, scales, outlier_cols


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def int8_mm(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """int8 [M, K] x int8 [N, K]^T -> int32 [M, N] via torch._int_mm.

    On CUDA _int_mm needs M > 16 and K, N multiples of 8: zero padding is added and cut off.
    """
    m, k = a.shape
    n = b_t.shape[0]
    if a.is_cuda:
        m_pad, k_pad, n_pad = max(m, 17), _round_up(k, 8), _round_up(n, 8)
        if (m_pad, k_pad) != (m, k):
            a = torch.nn.functional.pad(a, (0, k_pad - k, 0, m_pad - m))
        if (n_pad, k_pad) != (n, k):
            b_t = torch.nn.functional.pad(b_t, (0, k_pad - k, 0, n_pad - n))
        return torch._int_mm(a, b_t.t())[:m, :n]
    if m == 0 or n == 0 or k == 0:
        return torch.zeros((m, n), dtype=torch.int32, device=a.device)
    return torch._int_mm(a, b_t.t())


def int8_linear(
    x: torch.Tensor,
    weight: Int8Weight,
    bias: torch.Tensor | None = None,
    threshold: float = 6.0,
) -> torch.Tensor:
    """LLM.int8() linear layer: x [..., in] (any float dtype) -> [..., out] in x's dtype.

    Inlier columns: per-token int8 x per-row int8 weight -> int32, scaled by the outer product of
    the scales / 127**2. Outlier columns (any |x| >= threshold; threshold <= 0 disables) go
    through a float32 matmul against those weight columns dequantized. No autograd.
    """
    out_features, in_features = weight.shape
    if x.shape[-1] != in_features:
        raise QuantizationError(f"input has {x.shape[-1]} features; weight expects {in_features}")
    with torch.no_grad():
        x2d = x.detach().reshape(-1, in_features)
        codes, x_scales, cols = quantize_rows_with_outliers(x2d, threshold)
        acc = int8_mm(codes, weight.codes)
        out = acc * (x_scales[:, None] / 127.0) * (weight.scales[None, :] / 127.0)
        if cols.numel():
            w_cols = weight.codes.index_select(1, cols) * (weight.scales[:, None] / 127.0)
            out += x2d.index_select(1, cols).to(torch.float32) @ w_cols.t()
        if bias is not None:
            out += bias.to(torch.float32)
        return out.to(x.dtype).reshape(*x.shape[:-1], out_features)
