"""What crosses the peer's wire: tensors as swarm_mesh.Tensor messages, typed errors, parts.

Used by the peer's handlers (`swarm.peer.handler`) and by its client (`swarm.peer.client`).

Decoding never trusts the sender: codec, dtype, version, rank, element count, block size and the
exact byte lengths of codes and scales are checked before anything is allocated; scales must be
finite and non-negative. Any int8 / uint8 code is accepted (an int8 code of -128 decodes to
-128/127 of its scale). Byte order is little-endian, as on every platform torch supports here.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable

import numpy as np
import torch
from google.protobuf.message import DecodeError, Message

import kernels
from proto import peer_pb2, tensor_pb2
from swarm.errors import (
    AdapterMissing,
    BadRequest,
    CacheFull,
    PeerUnavailable,
    SessionExpired,
    SwarmError,
)
from swarm.model.lora import AdapterPayload, AdapterSpec, BlockTensors

WIRE_VERSION = 1
MAX_ELEMENTS = 1 << 28  # 1 GiB of float32: far above any stage's activations, far below harm
MAX_DIMS = 8
# Parts of 1 MiB keep every stream message far below hivemind's 4 MiB cap.
PART_BYTES = 1 << 20
# Requests above this go through the streaming RPCs (DESIGN: anything that can exceed 2 MiB).
UNARY_LIMIT_BYTES = 2 << 20
MAX_PARTS = 4096  # bounds a streamed message at 4 GiB

ERROR_KINDS: dict[str, type[SwarmError]] = {
    "BadRequest": BadRequest,
    "CacheFull": CacheFull,
    "SessionExpired": SessionExpired,
    "PeerUnavailable": PeerUnavailable,
    "AdapterMissing": AdapterMissing,
}
MAX_ADAPTER_TENSORS = 4096  # 7 targets x 2 tensors + a prompt, over hundreds of blocks
MAX_NAME_CHARS = 64


def error_to_wire(e: BaseException) -> peer_pb2.Error:
    """A typed error for the reply; anything unexpected becomes "Internal"."""
    kind = next((name for name, cls in ERROR_KINDS.items() if isinstance(e, cls)), "Internal")
    return peer_pb2.Error(kind=kind, message=str(e) or type(e).__name__)


def error_from_wire(err: peer_pb2.Error, peer: str) -> SwarmError:
    """The local exception for a peer's reported error, naming the peer."""
    cls = ERROR_KINDS.get(err.kind, PeerUnavailable)
    return cls(
        f"peer {peer}: {err.message}"
        if err.kind in ERROR_KINDS
        else f"peer {peer} failed ({err.kind}): {err.message}"
    )


class WireFormatError(BadRequest, kernels.QuantizationError):
    """A Tensor message that is malformed, inconsistent, or larger than the receiver allows."""


class RequestTooLarge(BadRequest):
    """A streamed request declaring more bytes than the peer accepts: refused unread."""


def to_proto(q: kernels.QuantizedTensor) -> tensor_pb2.Tensor:
    """Encode a QuantizedTensor into a swarm_mesh.Tensor message (copies codes to host memory)."""
    spec = kernels.parse_codec(q.codec)
    msg = tensor_pb2.Tensor(
        version=WIRE_VERSION,
        codec=spec.name,
        dtype=kernels.DTYPE_NAMES[q.dtype],
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


def from_proto(msg: tensor_pb2.Tensor, max_elements: int = MAX_ELEMENTS) -> kernels.QuantizedTensor:
    """Validate a swarm_mesh.Tensor message and turn it into a QuantizedTensor.

    max_elements: the largest element count this receiver accepts. Raises WireFormatError with
    the reason for any message that is inconsistent, unknown or too large.
    """
    spec, dtype, shape, numel, n_scales = _check(msg, max_elements)
    codes = _from_bytes(msg.codes, spec.code_dtype(dtype), numel)
    scales = None
    if spec.has_scales:
        scales = _from_bytes(msg.scales, torch.bfloat16, n_scales)
        if not bool(torch.isfinite(scales).all()) or bool((scales < 0).any()):
            raise WireFormatError("scales must be finite and non-negative")
    return kernels.QuantizedTensor(spec.name, shape, dtype, codes, scales, spec.block_size)


def _check(msg: tensor_pb2.Tensor, max_elements: int):
    """(codec spec, dtype, shape, element count, scale count) of a message whose fields agree
    and fit `max_elements`, before anything is allocated; WireFormatError naming the fault."""
    if not isinstance(msg, tensor_pb2.Tensor):
        raise WireFormatError(f"expected a swarm_mesh.Tensor message, got {type(msg).__name__}")
    if msg.version != WIRE_VERSION:
        raise WireFormatError(
            f"tensor wire version {msg.version} is not supported (this peer speaks {WIRE_VERSION})"
        )
    try:
        spec = kernels.parse_codec(msg.codec)
    except kernels.QuantizationError as e:
        raise WireFormatError(str(e)) from None
    if msg.dtype not in kernels.DTYPES:
        raise WireFormatError(
            f"unknown dtype {msg.dtype!r}: expected one of {', '.join(kernels.DTYPES)}"
        )
    dtype = kernels.DTYPES[msg.dtype]
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
    code_size = code_dtype.itemsize
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
    return spec, dtype, shape, numel, n_scales


def encode(x: torch.Tensor, codec: str) -> tensor_pb2.Tensor:
    """Quantize `x` with `codec` and encode it as a swarm_mesh.Tensor message."""
    if codec == "none" and x.dtype == torch.float32 and x.device.type == "cpu":
        return _plain_to_proto(x)
    return to_proto(kernels.quantize(x.detach().contiguous(), codec))


# The lossless float32 path of every decoding step goes through numpy: on this (shared) kind of
# machine each torch call after a few idle milliseconds costs 25-90 us (its code and data left
# the caches), and the general path makes about eight of them per tensor. The bytes are the
# same as to_proto(kernels.quantize(x, "none")) gives (tests/peer/test_wire.py).
def _plain_to_proto(x: torch.Tensor) -> tensor_pb2.Tensor:
    return tensor_pb2.Tensor(
        version=WIRE_VERSION,
        codec="none",
        dtype="float32",
        shape=list(x.shape),
        codes=x.detach().numpy().astype("<f4", copy=False).tobytes(),
    )


def _plain_from_proto(msg: tensor_pb2.Tensor, max_elements: int) -> np.ndarray | None:
    """A codec "none" float32 message's values, checked as from_proto checks them (a writable
    array of its shape, not the message's buffer); None for any other codec or dtype."""
    if not isinstance(msg, tensor_pb2.Tensor) or msg.codec != "none" or msg.dtype != "float32":
        return None
    shape = _check(msg, max_elements)[2]
    return np.frombuffer(bytearray(msg.codes), dtype="<f4").reshape(shape)


def deserialize(msg: tensor_pb2.Tensor, max_elements: int = MAX_ELEMENTS) -> torch.Tensor:
    """Validate and decode a swarm_mesh.Tensor message to a CPU tensor of its original dtype."""
    plain = _plain_from_proto(msg, max_elements)
    if plain is not None:
        return torch.from_numpy(plain)
    return kernels.dequantize(from_proto(msg, max_elements=max_elements))


def encode_bytes(x: torch.Tensor, codec: str) -> bytes:
    """encode() then protobuf-encode: a standalone byte string for one tensor."""
    return encode(x, codec).SerializeToString()


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


def decode(
    msg: tensor_pb2.Tensor,
    what: str,
    *,
    hidden_size: int,
    max_tokens: int,
    batch_size: int | None = None,
    seq_len: int | None = None,
) -> torch.Tensor:
    """Check and decode a [B, T, H] activation from the network (a request or a reply).

    The declared shape is checked against hidden_size, max_tokens (B * T) and, where given, the
    expected batch_size and seq_len before anything is allocated. Raises WireFormatError (a
    BadRequest) naming `what` on any fault; a client turns it into the peer's failure.
    """
    if not msg.ByteSize():
        raise WireFormatError(f"{what} is missing")
    shape = tuple(msg.shape)
    if len(shape) != 3:
        raise WireFormatError(f"{what} must have shape [batch, seq, hidden], got {list(shape)}")
    b, t, h = shape
    if h != hidden_size:
        raise WireFormatError(f"{what} has hidden size {h}, this model has {hidden_size}")
    if b <= 0 or t <= 0:
        raise WireFormatError(f"{what} is empty: shape {list(shape)}")
    if batch_size is not None and b != batch_size:
        raise WireFormatError(f"{what} has batch {b}, expected {batch_size}")
    if seq_len is not None and t != seq_len:
        raise WireFormatError(f"{what} has {t} positions, expected {seq_len}")
    if b * t > max_tokens:
        raise WireFormatError(
            f"{what} carries {b * t} tokens, more than this peer allows ({max_tokens})"
        )
    try:
        plain = _plain_from_proto(msg, max_tokens * hidden_size)
        if plain is not None:
            x, finite = torch.from_numpy(plain), bool(np.isfinite(plain).all())
        else:
            x = deserialize(msg, max_elements=max_tokens * hidden_size)
            finite = bool(torch.isfinite(x).all())
    except ValueError as e:  # WireFormatError, or a codec error from kernels
        raise WireFormatError(f"{what} is not a valid tensor: {e}") from None
    if not finite:
        raise WireFormatError(f"{what} contains NaN or infinite values")
    return x


def split(msg: Message, part_bytes: int = PART_BYTES) -> list[peer_pb2.Part]:
    """A message as parts of at most `part_bytes` bytes each (at least one part)."""
    data = msg.SerializeToString()
    count = max(1, -(-len(data) // part_bytes))
    return [
        peer_pb2.Part(data=data[i * part_bytes : (i + 1) * part_bytes], index=i, count=count)
        for i in range(count)
    ]


async def join(
    parts: AsyncIterator[peer_pb2.Part],
    msg_type: type[Message],
    max_bytes: int | None = None,
    reserve: Callable[[int], None] | None = None,
) -> Message | None:
    """Read one message's parts from a stream; None if the stream ends before a message starts.

    max_bytes: refuse (RequestTooLarge) a message whose first part declares more parts than
    that many bytes fill, or any part over PART_BYTES, before the next part is read.
    reserve(n): called once the first part is checked with the most bytes the message may
    hold (at most max_bytes); it may raise to refuse the message.
    Raises BadRequest on out-of-order parts, an inconsistent count, or unparseable bytes.
    """
    chunks: list[bytes] = []
    count = None
    size = 0
    async for part in parts:
        data = part.data  # once: upb copies a bytes field on every access
        if count is None:
            count = part.count
            if not 1 <= count <= MAX_PARTS:
                raise BadRequest(f"a message must have 1..{MAX_PARTS} parts, got {count}")
            # Every part but the last is PART_BYTES long: the count bounds the size from here.
            least = len(data) if count == 1 else (count - 1) * PART_BYTES + 1
            if max_bytes is not None and least > max_bytes:
                raise RequestTooLarge(
                    f"the request declares {count} parts (over {least - 1} bytes), more than "
                    f"this peer accepts ({max_bytes} bytes)"
                )
            if reserve is not None:
                most = len(data) if count == 1 else count * PART_BYTES
                reserve(most if max_bytes is None else min(most, max_bytes))
        if part.count != count or part.index != len(chunks):
            raise BadRequest(f"part {part.index} of {part.count} arrived out of order")
        size += len(data)
        if max_bytes is not None and (len(data) > PART_BYTES or size > max_bytes):
            raise RequestTooLarge(
                f"part {part.index} of {len(data)} bytes passes the limits of a part "
                f"({PART_BYTES}) or of a request ({max_bytes} bytes)"
            )
        if count == 1:  # the common case (a decode step): no list, no join
            return parse(data, msg_type)
        chunks.append(data)
        if len(chunks) == count:
            data = b"".join(chunks)
            chunks.clear()  # the parts' bytes go now, not when the caller's frame ends
            return parse(data, msg_type)
    if count is not None:
        raise BadRequest(f"the stream ended after {len(chunks)} of {count} parts")
    return None


def parse(data: bytes, msg_type: type[Message]) -> Message:
    """Parse protobuf bytes, turning garbage into a BadRequest."""
    msg = msg_type()
    try:
        msg.ParseFromString(data)
    except (DecodeError, RuntimeWarning, ValueError) as e:
        raise BadRequest(f"malformed {msg_type.__name__}: {e}") from None
    return msg


def adapter_to_wire(payload: AdapterPayload, with_tensors: bool) -> peer_pb2.Adapter:
    """An adapter message: spec and hash, and its tensors (exact float32) if `with_tensors`."""
    spec = payload.spec
    msg = peer_pb2.Adapter(
        hash=payload.hash,
        rank=spec.rank,
        alpha=spec.alpha,
        dropout=spec.dropout,
        targets=list(spec.targets),
        pre_seq_len=spec.pre_seq_len,
        seed=payload.seed,
    )
    if with_tensors:
        msg.tensors.extend(tensors_to_wire(payload.tensors))
    return msg


def tensors_to_wire(tensors: BlockTensors) -> list[peer_pb2.AdapterTensor]:
    return [
        peer_pb2.AdapterTensor(block=b, name=n, value=encode(t.detach(), "none"))
        for b in sorted(tensors)
        for n, t in sorted(tensors[b].items())
    ]


def tensors_from_wire(
    msgs, max_elements: int, what: str = "adapter tensor", max_total: int | None = None
) -> BlockTensors:
    """Block -> name -> float32 tensor; BadRequest on duplicates, lossy codecs, other dtypes.

    Each tensor's element count is checked against `max_elements`, and (if given) their sum
    against `max_total`, before anything is allocated.
    """
    if len(msgs) > MAX_ADAPTER_TENSORS:
        raise BadRequest(f"an adapter holds at most {MAX_ADAPTER_TENSORS} tensors, got {len(msgs)}")
    if max_total is not None:
        total = 0
        for m in msgs:  # declared sizes, before anything is decoded
            shape = list(m.value.shape)
            if len(shape) > MAX_DIMS or any(d > max_elements for d in shape):
                raise BadRequest(f"{what} {m.block}.{m.name} has shape {shape[: MAX_DIMS + 1]}")
            total += math.prod(shape)
        if total > max_total:
            raise BadRequest(
                f"the adapter holds {total} elements, more than this peer accepts ({max_total})"
            )
    out: BlockTensors = {}
    for m in msgs:
        if len(m.name) > MAX_NAME_CHARS:
            raise BadRequest(f"{what} name of {len(m.name)} characters is too long")
        if m.value.codec != "none" or m.value.dtype != "float32":
            raise BadRequest(
                f"{what} {m.block}.{m.name} must be float32 with codec 'none', "
                f"got {m.value.dtype or '?'} / {m.value.codec or '?'}"
            )
        if m.name in out.get(m.block, {}):
            raise BadRequest(f"{what} {m.block}.{m.name} appears twice")
        try:
            t = deserialize(m.value, max_elements=max_elements)
        except ValueError as e:
            raise BadRequest(f"{what} {m.block}.{m.name} is not valid: {e}") from None
        if not torch.isfinite(t).all():
            raise BadRequest(f"{what} {m.block}.{m.name} contains NaN or infinite values")
        out.setdefault(m.block, {})[m.name] = t
    return out


def adapter_from_wire(
    msg: peer_pb2.Adapter, max_elements: int, max_total: int | None = None
) -> tuple[AdapterSpec, BlockTensors | None, str, int]:
    """(spec, tensors or None when only the hash came, hash, seed), checked for consistency.

    max_elements bounds each tensor and max_total all of them, before decoding.
    """
    if len(msg.hash) != 64 or any(c not in "0123456789abcdef" for c in msg.hash):
        raise BadRequest("an adapter must name its sha256 hash (64 lowercase hex digits)")
    if len(msg.targets) > 16 or any(len(t) > MAX_NAME_CHARS for t in msg.targets):
        raise BadRequest("an adapter names too many or too long target modules")
    if not (math.isfinite(msg.alpha) and math.isfinite(msg.dropout)):
        raise BadRequest("adapter alpha and dropout must be finite")
    spec = AdapterSpec(
        rank=msg.rank,
        alpha=msg.alpha,
        dropout=msg.dropout,
        targets=tuple(msg.targets),
        pre_seq_len=msg.pre_seq_len,
    )
    spec.check()
    tensors = None
    if len(msg.tensors):
        tensors = tensors_from_wire(msg.tensors, max_elements, max_total=max_total)
    return spec, tensors, msg.hash, int(msg.seed)
