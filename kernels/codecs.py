"""Codec names, the QuantizedTensor record, and quantize/dequantize dispatch (torch or Triton).

Used through kernels/__init__.py by every part of Swarm Mesh that compresses a tensor.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re

import torch

from kernels import reference
from kernels.reference import QuantizationError

logger = logging.getLogger(__name__)

BLOCK_SIZES = tuple(2**k for k in range(5, 13))  # 32 .. 4096
FLOAT_CODECS = ("fp16", "bf16", "none")
CODECS = frozenset(
    ["int8-row", *FLOAT_CODECS]
    + [f"{family}-block{n}" for family in ("int8", "dynamic8") for n in BLOCK_SIZES]
)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_BLOCK_RE = re.compile(r"^(int8|dynamic8)-block([0-9]+)$")


@dataclasses.dataclass(frozen=True)
class CodecSpec:
    """A parsed codec name: kind is "linear-row", "linear", "dynamic" or a float codec name."""

    name: str
    kind: str
    block_size: int = 0  # 0 for codecs without blocks

    @property
    def has_scales(self) -> bool:
        return self.kind in ("linear-row", "linear", "dynamic")

    def code_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """Element type of the codes for an input of `dtype`."""
        return {
            "linear-row": torch.int8,
            "linear": torch.int8,
            "dynamic": torch.uint8,
            "fp16": torch.float16,
            "bf16": torch.bfloat16,
        }.get(self.kind, dtype)

    def num_scales(self, shape: tuple[int, ...]) -> int:
        """How many scales a tensor of `shape` carries (rows for int8-row, blocks otherwise)."""
        if not self.has_scales:
            return 0
        if self.kind == "linear-row":
            return math.prod(shape[:-1]) if shape else 1
        return -(-math.prod(shape) // self.block_size)


def is_valid_codec(name: str) -> bool:
    """True if `name` is a codec this library encodes and decodes."""
    return name in CODECS


def parse_codec(name: str) -> CodecSpec:
    """Parse a codec name; raises QuantizationError naming the valid forms."""
    if name == "int8-row":
        return CodecSpec(name, "linear-row")
    if name in FLOAT_CODECS:
        return CodecSpec(name, name)
    match = _BLOCK_RE.match(name) if isinstance(name, str) else None
    if match and int(match.group(2)) in BLOCK_SIZES:
        kind = "linear" if match.group(1) == "int8" else "dynamic"
        return CodecSpec(name, kind, int(match.group(2)))
    raise QuantizationError(
        f"unknown codec {name!r}: expected 'int8-row', 'int8-blockN', 'dynamic8-blockN' "
        f"(N a power of two from 32 to 4096), 'fp16', 'bf16' or 'none'"
    )


@dataclasses.dataclass
class QuantizedTensor:
    """A tensor in wire form: flat codes (+ bfloat16 scales) and what is needed to restore it.

    codec: codec name; shape, dtype: the original tensor's; codes: 1-D, row-major over the
    flattened tensor; scales: 1-D bfloat16 per row ("int8-row") or per block, None for float
    codecs; block_size: N of "*-blockN" codecs, else 0.
    """

    codec: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    codes: torch.Tensor
    scales: torch.Tensor | None
    block_size: int = 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of payload on the wire (codes + scales), excluding the small header."""
        total = self.codes.numel() * self.codes.element_size()
        if self.scales is not None:
            total += self.scales.numel() * self.scales.element_size()
        return total


def _check_input(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise QuantizationError(f"expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in DTYPE_NAMES:
        raise QuantizationError(
            f"cannot quantize dtype {x.dtype}: expected one of {', '.join(DTYPES)}"
        )


def _use_triton(x: torch.Tensor) -> bool:
    if not x.is_cuda:
        return False
    from kernels import triton_kernels

    return triton_kernels.available()


def quantize(x: torch.Tensor, codec: str) -> QuantizedTensor:
    """Compress `x` (float32/float16/bfloat16, any shape and strides) with the named codec.

    CUDA tensors go through fused Triton kernels when Triton is installed, others through the
    torch reference; both give the same codes. Raises QuantizationError for an unknown codec or
    dtype, and for NaN/inf under the int8 and dynamic8 codecs. No autograd graph is kept.
    """
    spec = parse_codec(codec)
    _check_input(x)
    shape = tuple(x.shape)
    with torch.no_grad():
        x = x.detach()
        if not spec.has_scales:
            codes = x.to(spec.code_dtype(x.dtype)).reshape(-1).contiguous()
            return QuantizedTensor(spec.name, shape, x.dtype, codes, None)
        if _use_triton(x):
            from kernels import triton_kernels

            codes, scales = triton_kernels.quantize(x, spec)
        elif spec.kind == "linear-row":
            rows = x.reshape(spec.num_scales(shape), shape[-1] if shape else 1)
            codes, scales = reference.encode_rows(rows, "linear")
            codes = codes.view(-1)
        else:
            codes, scales = reference.encode_blocks(x.reshape(-1), spec.block_size, spec.kind)
        return QuantizedTensor(
            spec.name, shape, x.dtype, codes, scales.to(torch.bfloat16), spec.block_size
        )


def dequantize(q: QuantizedTensor) -> torch.Tensor:
    """Restore a QuantizedTensor to its original shape and dtype (on the codes' device)."""
    spec = parse_codec(q.codec)
    with torch.no_grad():
        if not spec.has_scales:
            return q.codes.to(q.dtype).reshape(q.shape)
        if q.codes.is_cuda and _use_triton(q.codes):
            from kernels import triton_kernels

            return triton_kernels.dequantize(q, spec).reshape(q.shape)
        scales = q.scales.to(torch.float32)
        if spec.kind == "linear-row":
            rows = q.codes.view(scales.numel(), q.shape[-1] if q.shape else 1)
            return reference.decode_rows(rows, scales, "linear", q.dtype).reshape(q.shape)
        flat = reference.decode_blocks(q.codes, scales, spec.block_size, spec.kind, q.dtype)
        return flat.reshape(q.shape)
