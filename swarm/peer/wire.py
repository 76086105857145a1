"""What crosses the peer's wire: checked tensors, typed errors, and messages split into parts.

Used by the peer's handlers (`swarm.peer.handler`) and by its client (`swarm.peer.client`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import torch
from google.protobuf.message import DecodeError, Message

import kernels
from proto import peer_pb2, tensor_pb2
from swarm.errors import BadRequest, CacheFull, PeerUnavailable, SessionExpired, SwarmError

# Parts of 1 MiB keep every stream message far below hivemind's 4 MiB cap.
PART_BYTES = 1 << 20
# Requests above this go through the streaming RPCs (DESIGN: anything that can exceed 2 MiB).
UNARY_LIMIT_BYTES = 2 << 20
MAX_PARTS = 4096  # bounds a streamed message at 4 GiB
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

ERROR_KINDS: dict[str, type[SwarmError]] = {
    "BadRequest": BadRequest,
    "CacheFull": CacheFull,
    "SessionExpired": SessionExpired,
    "PeerUnavailable": PeerUnavailable,
}


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


def encode(x: torch.Tensor, codec: str) -> tensor_pb2.Tensor:
    """Serialize a tensor with a wire codec (kernels' format)."""
    return kernels.serialize(x.detach().contiguous(), codec)


def decode(
    msg: tensor_pb2.Tensor,
    what: str,
    hidden_size: int,
    max_tokens: int,
    batch_size: int | None = None,
) -> torch.Tensor:
    """Decode and check a [B, T, H] activation; every failure is a BadRequest naming `what`."""
    if not msg.ByteSize():
        raise BadRequest(f"{what} is missing")
    shape = tuple(msg.shape)
    if len(shape) != 3:
        raise BadRequest(f"{what} must have shape [batch, seq, hidden], got {list(shape)}")
    b, t, h = shape
    if h != hidden_size:
        raise BadRequest(f"{what} has hidden size {h}, this model has {hidden_size}")
    if b <= 0 or t <= 0:
        raise BadRequest(f"{what} is empty: shape {list(shape)}")
    if b * t > max_tokens:
        raise BadRequest(
            f"{what} carries {b * t} tokens, more than this peer allows ({max_tokens})"
        )
    if batch_size is not None and b != batch_size:
        raise BadRequest(f"{what} has batch {b}, the session was opened with batch {batch_size}")
    try:
        x = kernels.deserialize(msg, max_elements=max_tokens * hidden_size)
    except ValueError as e:  # kernels.WireFormatError and codec errors
        raise BadRequest(f"{what} is not a valid tensor: {e}") from None
    if x.dtype not in FLOAT_DTYPES:
        raise BadRequest(f"{what} has dtype {x.dtype}, expected float32, float16 or bfloat16")
    if tuple(x.shape) != shape:
        raise BadRequest(f"{what} decoded to shape {list(x.shape)}, declared {list(shape)}")
    if not torch.isfinite(x).all():
        raise BadRequest(f"{what} contains NaN or infinite values")
    return x


def split(msg: Message, part_bytes: int = PART_BYTES) -> list[peer_pb2.Part]:
    """A message as parts of at most `part_bytes` bytes each (at least one part)."""
    data = msg.SerializeToString()
    count = max(1, -(-len(data) // part_bytes))
    return [
        peer_pb2.Part(data=data[i * part_bytes : (i + 1) * part_bytes], index=i, count=count)
        for i in range(count)
    ]


async def join(parts: AsyncIterator[peer_pb2.Part], msg_type: type[Message]) -> Message | None:
    """Read one message's parts from a stream; None if the stream ends before a message starts.

    Raises BadRequest on out-of-order parts, an inconsistent count, or unparseable bytes.
    """
    chunks: list[bytes] = []
    count = None
    async for part in parts:
        if count is None:
            count = part.count
            if not 1 <= count <= MAX_PARTS:
                raise BadRequest(f"a message must have 1..{MAX_PARTS} parts, got {count}")
        if part.count != count or part.index != len(chunks):
            raise BadRequest(f"part {part.index} of {part.count} arrived out of order")
        chunks.append(part.data)
        if len(chunks) == count:
            return parse(b"".join(chunks), msg_type)
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
