"""Wire encoding of QuantizedTensor as the protobuf message swarm_mesh.Tensor (proto/tensor.proto).

Used by swarm and petals_like to put activations and gradients into their RPC messages.

Decoding never trusts the sender: codec, dtype, version, rank, element count, block size and the
exact byte lengths of codes and scales are checked before anything is allocated; scales must be
finite and non-negative. Any int8 / uint8 code is accepted (an int8 code of -128 decodes to
-128/127 of its scale). Byte order is little-endian, as on every platform torch supports here.
"""

from __future__ import annotations

import logging
import math

import torch
from google.protobuf.message import DecodeError

from kernels.codecs import (
    DTYPE_NAMES,
    DTYPES,
    QuantizedTensor,
    dequantize,
    parse_codec,
    quantize,
)
from kernels.reference import QuantizationError
from proto import tensor_pb2

logger = logging.getLogger(__name__)

WIRE_VERSION = 1
MAX_ELEMENTS = 1 << 28  # 1 GiB of float32: far above any stage's activations, far below harm
MAX_DIMS = 8


class WireFormatError(QuantizationError):
    """A Tensor message that is malformed, inconsistent, or larger than the receiver allows."""


def to_proto(q: QuantizedTensor) -> tensor_pb2.Tensor:
    """Encode a QuantizedTensor into a swarm_mesh.Tensor message (copies codes to host memory)."""
    spec = parse_codec(q.codec)
    msg = tensor_pb2.Tensor(
        version=WIRE_VERSION,
        codec=spec.name,
        dtype=DTYPE_NAMES[q.dtype],
        shape=list(q.shape),
        block_size=spec.block_size,
        codes=_tensor_bytes(q.codes),
    )
    if q.scales is not None:
        msg.scales = _tensor_bytes(q.scales.to(torch.bfloat16))
    return msg


def _tensor_bytes(t: torch.Tensor) -> bytes:
    flat = t.detach().reshape(-1).contiguous().cpu()
    if flat.numel() == 0:
        return b""
    return flat.view(torch.uint8).numpy().tobytes()


def _from_bytes(data: bytes, dtype: torch.dtype, count: int) -> torch.Tensor:
    if count == 0:
        return torch.empty(0, dtype=dtype)
    # bytearray copies: the tensor must own writable memory, not the message's buffer
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype)


def from_proto(msg: tensor_pb2.Tensor, max_elements: int = MAX_ELEMENTS) -> QuantizedTensor:
    """Validate a swarm_mesh.Tensor message and turn it into a QuantizedTensor.

    max_elements: the largest element count this receiver accepts. Raises WireFormatError with
    the reason for any message that is inconsistent, unknown or too large.
    """
    if not isinstance(msg, tensor_pb2.Tensor):
        raise WireFormatError(f"expected a swarm_mesh.Tensor message, got {type(msg).__name__}")
    if msg.version != WIRE_VERSION:
        raise WireFormatError(
            f"tensor wire version {msg.version} is not supported (this peer speaks {WIRE_VERSION})"
        )
    try:
        spec = parse_codec(msg.codec)
    except QuantizationError as e:
        raise WireFormatError(str(e)) from None
    if msg.dtype not in DTYPES:
        raise WireFormatError(f"unknown dtype {msg.dtype!r}: expected one of {', '.join(DTYPES)}")
    dtype = DTYPES[msg.dtype]
    shape = tuple(msg.shape)
    if len(shape) > MAX_DIMS:
        raise WireFormatError(f"tensor has {len(shape)} dimensions, more than {MAX_DIMS}")
    if any(d > max_elements for d in shape):
        raise WireFormatError(f"tensor shape {shape} has a dimension above {max_elements}")
    numel = math.prod(shape)
    if numel > max_elements:
        raise WireFormatError(f"tensor of {numel} elements exceeds the limit of {max_elements}")
    if msg.block_size != spec.block_size:
        raise WireFormatError(
            f"block_size {msg.block_size} does not match codec {spec.name!r}"
            f" (expected {spec.block_size})"
        )
    code_dtype = spec.code_dtype(dtype)
    code_size = torch.empty(0, dtype=code_dtype).element_size()
    if len(msg.codes) != numel * code_size:
        raise WireFormatError(
            f"codes hold {len(msg.codes)} bytes; shape {shape} under {spec.name!r} needs"
            f" {numel * code_size}"
        )
    n_scales = spec.num_scales(shape)
    if n_scales > max_elements:
        raise WireFormatError(f"tensor shape {shape} implies {n_scales} scales, above the limit")
    if len(msg.scales) != 2 * n_scales:
        raise WireFormatError(
            f"scales hold {len(msg.scales)} bytes; shape {shape} under {spec.name!r} needs"
            f" {2 * n_scales}"
        )
    codes = _from_bytes(msg.codes, code_dtype, numel)
    scales = None
    if spec.has_scales:
        scales = _from_bytes(msg.scales, torch.bfloat16, n_scales)
        if not bool(torch.isfinite(scales).all()) or bool((scales < 0).any()):
            raise WireFormatError("scales must be finite and non-negative")
    return QuantizedTensor(spec.name, shape, dtype, codes, scales, spec.block_size)


def serialize(x: torch.Tensor, codec: str) -> tensor_pb2.Tensor:
    """Quantize `x` with `codec` and encode it as a swarm_mesh.Tensor message."""
    return to_proto(quantize(x, codec))


def deserialize(msg: tensor_pb2.Tensor, max_elements: int = MAX_ELEMENTS) -> torch.Tensor:
    """Validate and decode a swarm_mesh.Tensor message to a CPU tensor of its original dtype."""
    return dequantize(from_proto(msg, max_elements=max_elements))


def encode_bytes(x: torch.Tensor, codec: str) -> bytes:
    """serialize() then protobuf-encode: a standalone byte string for one tensor."""
    return serialize(x, codec).SerializeToString()


def decode_bytes(
    data: bytes, max_elements: int = MAX_ELEMENTS, max_bytes: int | None = None
) -> torch.Tensor:
    """Parse protobuf bytes of a swarm_mesh.Tensor and decode it; WireFormatError on any fault.

    max_bytes: refuse longer inputs before parsing (default: what max_elements float32 need).
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireFormatError(f"expected bytes, got {type(data).__name__}")
    limit = max_bytes if max_bytes is not None else 4 * max_elements + (1 << 20)
    if len(data) > limit:
        raise WireFormatError(f"message of {len(data)} bytes exceeds the limit of {limit}")
    msg = tensor_pb2.Tensor()
    try:
        msg.ParseFromString(bytes(data))
    except (DecodeError, ValueError, RuntimeError) as e:
        raise WireFormatError(f"malformed tensor message: {e}") from None
    return deserialize(msg, max_elements=max_elements)
