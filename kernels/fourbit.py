"""4-bit block-wise weights as in QLoRA: NF4, FP4 or Int4 codes in blocks of 64, two per byte,
with double-quantized absmax. The torch reference (the specification) and the CPU matmul path.

Used by swarm.model.fourbit (`--quant nf4|fp4|int4`); kernels.triton_fourbit and
kernels.triton_dequant_mm are the CUDA kernels and are tested against this file.

The rules, shared bit for bit with the Triton codec:
- flat index i of the row-major [out, in] weight is in block i // 64 (the last may be shorter);
  absmax a_b = max |w| of block b, in float32.
- double quantization (QLoRA): mean = fp32(mean of a in float64); a - mean is quantized with the
  dynamic8-block256 codec (8-bit dynamic codebook, one scale per 256 blocks, rounded up to
  bfloat16, kernels.reference); dequantized absmax d_b = fp32(fp32(table[c] * s) + mean).
- code of w_i = number of codebook midpoints < y, y = fp32(w_i / d_b) (0 where d_b == 0);
  encoding against d_b (not a_b) makes the decoder's scale the one the codes were chosen for.
- byte i // 2 holds code i in its low nibble when i is even, high nibble when odd.
- decode: w_i = fp32(codebook[code] * d_b).
- kept columns (optional, GPTQ's outlier inputs, kernels.gptq): input columns `kept_cols` of a
  2-D weight hold the zero code, and their float16 values `kept_values` [out, k] are added to
  the decode (so they decode to exactly fp32(fp16 value)); the matmul adds x[:, cols] @ values^T.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch

from kernels import reference
from kernels.dynamic_codebook import dynamic_codebook
from kernels.reference import QuantizationError

BLOCK = 64
ABSMAX_BLOCK = 256
_CHUNK_VALUES = 1 << 20  # encode scratch: ~20 bytes per value of a chunk (int64 codes, scales)
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# NormalFloat4 (QLoRA, appendix E): quantiles of N(0, 1) scaled to [-1, 1], with an exact zero.
_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]  # fmt: skip
# FP4 E2M1 (sign, 2 exponent bits, 1 mantissa bit: 0, 0.5, 1, 1.5, 2, 3, 4, 6) over its max 6.
_E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
_FP4 = sorted({-v / 6.0 for v in _E2M1} | {v / 6.0 for v in _E2M1})
# Int4: symmetric absmax integers -7..7 over 7 (15 levels, as absmax int8 uses -127..127).
_INT4 = [k / 7.0 for k in range(-7, 8)]
# 15-level codebooks repeat their top value: code 15 decodes to 1.0 like code 14, never chosen.
_CODEBOOKS = {
    "nf4": _NF4,
    "fp4": _FP4 + [1.0] * (16 - len(_FP4)),
    "int4": _INT4 + [1.0] * (16 - len(_INT4)),
}
KINDS = tuple(_CODEBOOKS)


def _check_kind(kind: str) -> None:
    if kind not in _CODEBOOKS:
        raise QuantizationError(f"unknown 4-bit kind {kind!r}; choose one of {', '.join(KINDS)}")


@functools.cache
def codebook(kind: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 values (float32, ascending) that 4-bit codes of `kind` decode to (times absmax)."""
    _check_kind(kind)
    return torch.tensor(_CODEBOOKS[kind], dtype=torch.float32, device=device)


@functools.cache
def midpoints(kind: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 15 float32 midpoints between neighbouring codebook entries (ties go to the lower)."""
    table = codebook(kind, "cpu")
    return ((table[:-1] + table[1:]) * 0.5).to(device)


@functools.cache
def pair_table(kind: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """int64 [256]: the bits of the two float32 values a packed byte decodes to (low nibble
    first in memory), so that one 1-D gather decodes two codes; view the result as float32.

    A 1-D gather of 8-byte words from a 2 KiB table is the fastest decode torch offers on CPU:
    about 2-3x faster than a 2-D index_select of [65536, 4] float rows (4 codes per gather).
    """
    table = codebook(kind, "cpu")
    byte = torch.arange(256)
    pairs = torch.stack([table[byte & 15], table[byte >> 4]], dim=1).contiguous()
    return pairs.view(torch.int64).view(-1).to(device)


@dataclasses.dataclass
class FourBitWeight:
    """A float weight as packed 4-bit codes with double-quantized block absmax.

    packed: uint8 [2 * ceil(numel / 4)]; absmax_codes: uint8 [blocks], dynamic8 codes of
    absmax - absmax_mean; absmax_scales: float32 [ceil(blocks / 256)]; absmax_mean: float32
    0-d; shape: the weight's shape; kind: "nf4", "fp4" or "int4". kept_cols: int32 [k] input
    columns kept in float16 as kept_values [out, k] (None: none; see the module's rules).
    """

    packed: torch.Tensor
    absmax_codes: torch.Tensor
    absmax_scales: torch.Tensor
    absmax_mean: torch.Tensor
    shape: tuple[int, ...]
    kind: str
    kept_cols: torch.Tensor | None = None
    kept_values: torch.Tensor | None = None

    @property
    def kept(self) -> int:
        """How many input columns are kept in float16."""
        return 0 if self.kept_cols is None else self.kept_cols.numel()

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes held: codes, 8-bit absmax, its float32 scales and mean (the whole overhead)."""
        return (
            self.packed.numel()
            + self.absmax_codes.numel()
            + 4 * self.absmax_scales.numel()
            + 4 * self.absmax_mean.numel()
            + (0 if self.kept_cols is None else 4 * self.kept_cols.numel())
            + (0 if self.kept_values is None else 2 * self.kept_values.numel())
        )

    def absmax(self) -> torch.Tensor:
        """The dequantized absmax of every block, float32 [blocks]."""
        return dequantize_absmax(self.absmax_codes, self.absmax_scales, self.absmax_mean)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight the codes stand for, of `shape` and `dtype`."""
        return dequantize_4bit(self).to(dtype)


def block_absmax(flat: torch.Tensor) -> torch.Tensor:
    """float32 max |x| of each block of BLOCK consecutive values (the last may be shorter)."""
    n = flat.numel()
    n_full = n // BLOCK
    parts = [flat[: n_full * BLOCK].view(n_full, BLOCK).abs().amax(dim=1)]
    if n_full * BLOCK < n:
        parts.append(flat[n_full * BLOCK :].abs().amax().view(1))
    return torch.cat(parts).to(torch.float32)


def quantize_absmax(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """QLoRA's double quantization: (uint8 codes, float32 scales per 256, float32 mean)."""
    mean = absmax.to(torch.float64).mean().to(torch.float32)
    codes, scales = reference.encode_blocks(absmax - mean, ABSMAX_BLOCK, "dynamic")
    return codes, scales, mean


def dequantize_absmax(codes: torch.Tensor, scales: torch.Tensor, mean: torch.Tensor):
    """float32 [blocks]: fp32(table[code] * scale) + mean (reference.decode_blocks' arithmetic
    in three ops: it runs at every matmul, so no chunking and no scratch).
    """
    n = codes.numel()
    out = dynamic_codebook(codes.device).index_select(0, codes.to(torch.int32))
    n_full = n // ABSMAX_BLOCK
    out[: n_full * ABSMAX_BLOCK].view(n_full, ABSMAX_BLOCK).mul_(scales[:n_full, None])
    if n_full * ABSMAX_BLOCK < n:
        out[n_full * ABSMAX_BLOCK :].mul_(scales[n_full])
    return out.add_(mean.to(out.device))


def _per_value(d: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """The block scale of flat values [start, start + count), float32 [count]."""
    idx = torch.arange(start, start + count, device=d.device) // BLOCK
    return d.index_select(0, idx)


def encode_codes(flat: torch.Tensor, d: torch.Tensor, kind: str) -> torch.Tensor:
    """uint8 codes (one per value, unpacked) of a flat float tensor against block scales d."""
    mids = midpoints(kind, flat.device)
    n = flat.numel()
    codes = torch.empty(n, dtype=torch.uint8, device=flat.device)
    for s in range(0, n, _CHUNK_VALUES):
        x = flat[s : s + _CHUNK_VALUES].to(torch.float32)
        scale = _per_value(d, s, x.numel())
        y = torch.where(scale != 0, x / torch.where(scale != 0, scale, 1.0), 0.0)
        codes[s : s + x.numel()] = torch.bucketize(y, mids).to(torch.uint8)
    return codes


def pack(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte, even index in the low nibble; zero codes pad the tail to a
    multiple of 4 (an even number of bytes, so a kernel may read the codes two bytes at a time).
    """
    pad = -codes.numel() % 4
    if pad:
        codes = torch.cat([codes, codes.new_zeros(pad)])
    pairs = codes.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The n uint8 codes of pack's output."""
    return torch.stack([packed & 15, packed >> 4], dim=1).view(-1)[:n]


def quantize_4bit(w: torch.Tensor, kind: str = "nf4") -> FourBitWeight:
    """Quantize a float tensor (a [out, in] weight) to 4-bit codes of `kind`."""
    _check_kind(kind)
    if not isinstance(w, torch.Tensor) or w.dtype not in _FLOAT_DTYPES or w.numel() == 0:
        raise QuantizationError("quantize_4bit expects a non-empty float32/float16/bfloat16 tensor")
    with torch.no_grad():
        flat = w.detach().reshape(-1)
        absmax = block_absmax(flat)
        if not bool(torch.isfinite(absmax).all()):
            raise QuantizationError("cannot quantize a weight holding NaN or inf")
        codes8, scales, mean = quantize_absmax(absmax)
        d = dequantize_absmax(codes8, scales, mean)
        packed = pack(encode_codes(flat, d, kind))
    return FourBitWeight(packed, codes8, scales, mean, tuple(w.shape), kind)


def dequantize_4bit(q: FourBitWeight) -> torch.Tensor:
    """The reference decode: float32 tensor of q.shape, fp32(codebook[code] * d_block)."""
    d = q.absmax()
    codes = unpack(q.packed, q.numel).to(torch.int64)
    values = codebook(q.kind, q.packed.device).index_select(0, codes)
    return _add_kept((values * _per_value(d, 0, q.numel)).view(q.shape), q)


def _add_kept(w: torch.Tensor, q: FourBitWeight) -> torch.Tensor:
    """w (the decode of q's codes) plus q's kept float16 columns, in place."""
    if q.kept:
        cols = q.kept_cols.to(w.device, torch.int64)
        w.index_add_(1, cols, q.kept_values.to(w.device, torch.float32))
    return w


def fast_dequantize(q: FourBitWeight, d: torch.Tensor | None = None) -> torch.Tensor:
    """Same values as dequantize_4bit (float32 [out, in]), in two passes: one gather of two
    values per byte (pair_table), one multiply by the block scale. The CPU matmul path.
    """
    d = q.absmax() if d is None else d
    n = q.numel
    pairs = pair_table(q.kind, q.packed.device).index_select(0, q.packed.to(torch.int32))
    flat = pairs.view(torch.float32)[:n]
    n_full = n // BLOCK
    flat[: n_full * BLOCK].view(n_full, BLOCK).mul_(d[:n_full, None])
    if n_full * BLOCK < n:
        flat[n_full * BLOCK :].mul_(d[n_full])
    return _add_kept(flat.view(q.shape), q)


def fourbit_linear(
    x: torch.Tensor, q: FourBitWeight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x [..., in] @ dequantized weight^T (+ bias) -> [..., out] in x's dtype. No autograd.

    Dequantizes on the fly for every call (the weight is never kept in float): on CUDA with
    Triton, inside the matmul's tiles (kernels.triton_dequant_mm); elsewhere by fast_dequantize
    then one float32 matmul.
    """
    out_features, in_features = q.shape
    if x.shape[-1] != in_features:
        raise QuantizationError(f"input has {x.shape[-1]} features; weight expects {in_features}")
    with torch.no_grad():
        x2d = x.detach().reshape(-1, in_features)
        if x2d.is_cuda:
            from kernels import triton_dequant_mm

            if triton_dequant_mm.available():
                out = triton_dequant_mm.fourbit_dequant_mm(x2d, q)  # the codes only
                if q.kept:
                    cols = q.kept_cols.to(x2d.device, torch.int64)
                    kept = x2d.index_select(1, cols).to(torch.float32)
                    out += kept @ q.kept_values.to(torch.float32).t()
            else:
                out = x2d.to(torch.float32) @ fast_dequantize(q).t()
        else:
            out = torch.nn.functional.linear(x2d.to(torch.float32), fast_dequantize(q))
        if bias is not None:
            out += bias.to(torch.float32)
        return out.to(x.dtype).reshape(*x.shape[:-1], out_features)
