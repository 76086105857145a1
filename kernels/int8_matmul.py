"""LLM.int8() pieces: row-wise int8 weights, per-token activation quantization with outlier
columns split off, and the int8 x int8 -> int32 matmul with dequantization. Used by swarm's model.

Inference only: every function runs under torch.no_grad() and returns tensors without history.
Weights keep float32 scales (exact absmax, no bf16 rounding: they never cross the wire per call).
"""

from __future__ import annotations

import dataclasses
import logging
import math

import torch

from kernels.reference import TINY_ABSMAX, QuantizationError

logger = logging.getLogger(__name__)

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
PATHS = ("auto", "weight-only", "int8")
WEIGHT_ONLY_MAX_TOKENS_CPU = 4


@dataclasses.dataclass
class Int8Weight:
    """A [out, in] weight as int8 codes with one absmax scale per output row.

    codes: int8 [out, in]; scales: float32 [out], row absmax; w ~= codes * scales[:, None] / 127.
    pack_scales: bfloat16 scales / 127 for the CPU weight-only kernel, if the holder keeps them
    (swarm.model.int8.Int8Linear does); None: made at each call (4 us of a 11 us M=1 matmul).
    """

    codes: torch.Tensor
    scales: torch.Tensor
    pack_scales: torch.Tensor | None = None

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


def weight_only_supported(weight: Int8Weight, device: torch.device) -> bool:
    """True where the weight-only kernel runs: CUDA with Triton, or CPU with K % 16 == 0."""
    if device.type == "cuda":
        from kernels import triton_dequant_mm

        return triton_dequant_mm.available()
    # torch 2.13's CPU _weight_int8pack_mm reads out of bounds (segfaults) when K % 16 != 0.
    return device.type == "cpu" and weight.shape[1] % 16 == 0


def weight_only_max_tokens(device: torch.device) -> int:
    """Most rows (tokens) for which the weight-only path beats LLM.int8(), on this device kind.

    CPU: measured with simulations/bench_matmul.py and bench_local on SmolLM2's four shapes
    (2-core x86, torch 2.13): the bf16 pack kernel wins at M = 1..WEIGHT_ONLY_MAX_TOKENS_CPU,
    _int_mm from there up (hot weights: crossover at M = 4-6; whole model, 1 thread: weight-only
    1.34x faster at batch 4, even at 16). CUDA: _int_mm needs M > 16, below that Triton.
    """
    return 16 if device.type == "cuda" else WEIGHT_ONLY_MAX_TOKENS_CPU


def int8_weight_only_mm(x2d: torch.Tensor, weight: Int8Weight) -> torch.Tensor:
    """x2d [M, K] float @ dequantized weight^T -> float32 [M, N]; activations stay in float.

    No activation quantization, so no outlier columns are needed: outliers pass at full
    (bf16 on CPU) precision. CPU: torch's _weight_int8pack_mm on bf16 activations (its fp32
    variant is ~5x slower than a fp32 matmul); CUDA: kernels.triton_dequant_mm.int8_dequant_mm.
    """
    if x2d.is_cuda:
        from kernels import triton_dequant_mm

        return triton_dequant_mm.int8_dequant_mm(x2d, weight.codes, weight.scales)
    scales = weight.pack_scales if weight.pack_scales is not None else pack_scales(weight.scales)
    out = torch.ops.aten._weight_int8pack_mm(x2d.to(torch.bfloat16), weight.codes, scales)
    return out.to(torch.float32)


def pack_scales(scales: torch.Tensor) -> torch.Tensor:
    """The scales the CPU weight-only kernel takes: bfloat16(float32 row absmax / 127)."""
    return (scales / 127.0).to(torch.bfloat16)


def int8_activation_mm(x2d: torch.Tensor, weight: Int8Weight, threshold: float) -> torch.Tensor:
    """LLM.int8(): per-token int8 activations x row-wise int8 weights -> float32 [M, N].

    Outlier columns (any |x| >= threshold; threshold <= 0 disables) go through a float matmul
    against those weight columns dequantized: the per-token int8 scale is set by the largest
    |x| of the row, so one outlier feature would otherwise flatten the rest of the row to a few
    codes. When no value reaches the threshold (one max over the batch says so), the split is
    skipped: the common case, and a dozen fewer small ops per call.
    """
    x2d = x2d.to(torch.float32)
    absmax = x2d.abs().amax(dim=1, keepdim=True)
    top = float(absmax.max()) if x2d.numel() else 0.0
    if not math.isfinite(top):
        raise QuantizationError("cannot quantize a tensor holding NaN or inf")
    if threshold > 0 and top >= threshold:
        return _int8_with_outliers(x2d, weight, threshold)
    step = absmax.clamp_min_(TINY_ABSMAX).div_(127.0)
    codes = torch.div(x2d, step).round_().to(torch.int8)
    acc = int8_mm(codes, weight.codes)
    return acc * (step * (weight.scales / 127.0))


def _int8_with_outliers(x2d: torch.Tensor, weight: Int8Weight, threshold: float) -> torch.Tensor:
    codes, x_scales, cols = quantize_rows_with_outliers(x2d, threshold)
    acc = int8_mm(codes, weight.codes)
    out = acc * (x_scales[:, None] / 127.0) * (weight.scales[None, :] / 127.0)
    if cols.numel():
        w_cols = weight.codes.index_select(1, cols) * (weight.scales[:, None] / 127.0)
        out += x2d.index_select(1, cols) @ w_cols.t()
    return out


def choose_path(m: int, weight: Int8Weight, device: torch.device) -> str:
    """ "weight-only" for small batches (decode) where supported, else "int8" (LLM.int8())."""
    if m <= weight_only_max_tokens(device) and weight_only_supported(weight, device):
        return "weight-only"
    return "int8"


def int8_linear(
    x: torch.Tensor,
    weight: Int8Weight,
    bias: torch.Tensor | None = None,
    threshold: float = 6.0,
    path: str = "auto",
) -> torch.Tensor:
    """Linear layer with int8 weights: x [..., in] (any float dtype) -> [..., out] in x's dtype.

    path: "auto" picks by the number of rows (choose_path), "weight-only" keeps activations in
    float (int8_weight_only_mm), "int8" quantizes them per token (LLM.int8(), with outlier
    columns in float when threshold > 0; int8_activation_mm). No autograd: callers that need
    input gradients use swarm.model.int8.Int8Linear.
    """
    out_features, in_features = weight.codes.shape
    if x.shape[-1] != in_features:
        raise QuantizationError(f"input has {x.shape[-1]} features; weight expects {in_features}")
    if path not in PATHS:
        raise QuantizationError(f"unknown int8 path {path!r}; choose one of {', '.join(PATHS)}")
    if torch.is_grad_enabled():
        with torch.no_grad():
            return _int8_linear(x, weight, bias, threshold, path)
    return _int8_linear(x, weight, bias, threshold, path)


def _int8_linear(x, weight: Int8Weight, bias, threshold: float, path: str) -> torch.Tensor:
    """int8_linear's body. Decode calls it ~200 times a token, each a ~11 us matmul at M = 1 on
    CPU: the checks and conversions around it are kept to those needed (they were 18 us)."""
    out_features, in_features = weight.codes.shape
    x2d = x if x.dim() == 2 else x.reshape(-1, in_features)
    m, device = x2d.shape[0], x2d.device
    if path == "auto":
        path = choose_path(m, weight, device)  # checks that the weight-only kernel runs here
    elif path == "weight-only" and not weight_only_supported(weight, device):
        path = "int8"
    if path == "weight-only" and m:
        out = int8_weight_only_mm(x2d, weight)
    else:
        out = int8_activation_mm(x2d, weight, threshold)
    if bias is not None:
        out += bias.to(torch.float32)
    if out.dtype != x.dtype:
        out = out.to(x.dtype)
    return out if x.dim() == 2 else out.reshape(*x.shape[:-1], out_features)
