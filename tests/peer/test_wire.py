"""Tests of the peer's wire layer (swarm/peer/wire.py, proto/tensor.proto): tensors, hostile input.

Run by pytest (tests/peer); in-process, no peers.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kernels
from proto import tensor_pb2
from swarm.errors import BadRequest, PeerUnavailable
from swarm.peer import wire
from swarm.peer.client import _decoded

CODECS = ["int8-row", "int8-block64", "dynamic8-block256", "fp16", "bf16", "none"]


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_matches_in_memory(codec, dtype):
    torch.manual_seed(0)
    x = torch.randn(3, 4, 100).to(dtype)
    expected = kernels.dequantize(kernels.quantize(x, codec))
    msg = wire.encode(x, codec)
    assert isinstance(msg, tensor_pb2.Tensor)
    assert torch.equal(wire.deserialize(msg), expected)
    assert torch.equal(wire.decode_bytes(wire.encode_bytes(x, codec)), expected)
    q = wire.from_proto(msg)
    assert q.nbytes == kernels.quantize(x, codec).nbytes


@pytest.mark.parametrize(
    "x",
    [
        torch.randn(1, 1, 576),
        torch.randn(3, 8, 5).transpose(0, 2),  # not contiguous
        torch.randn(2, 3, requires_grad=True),
        torch.tensor(1.5),
        torch.empty(0, 7),
        torch.tensor([float("inf"), -0.0, float("nan")]),
    ],
)
def test_plain_float32_fast_path_gives_the_general_paths_bytes(x):
    general = wire.to_proto(kernels.quantize(x.detach().contiguous(), "none"))
    msg = wire.encode(x, "none")
    assert msg.SerializeToString() == general.SerializeToString()
    y = wire.deserialize(msg)
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert torch.equal(y.view(torch.int32), x.detach().contiguous().view(torch.int32))
    y[...] = 0  # owns writable memory, not the message's buffer
    assert wire.deserialize(msg).view(torch.int32).equal(x.detach().contiguous().view(torch.int32))


def test_empty_and_scalar_round_trip():
    for x in [torch.empty(0, 7), torch.tensor(1.5)]:
        for codec in CODECS:
            y = wire.decode_bytes(wire.encode_bytes(x, codec))
            assert y.shape == x.shape


def test_nested_in_another_message_bytes_size():
    x = torch.randn(64, 1024)
    msg = wire.encode(x, "int8-block64")
    assert len(msg.SerializeToString()) < x.numel() * 1.04


def _good(codec="int8-block64"):
    return wire.encode(torch.randn(4, 64), codec)


def _mutated(**changes):
    msg = _good(changes.pop("codec_src", "int8-block64"))
    for key, value in changes.items():
        if key == "shape":
            del msg.shape[:]
            msg.shape.extend(value)
        else:
            setattr(msg, key, value)
    return msg


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"version": 2}, "version"),
        ({"version": 0}, "version"),
        ({"codec": "int3"}, "unknown codec"),
        ({"codec": "int8-block63"}, "unknown codec"),
        ({"dtype": "float64"}, "unknown dtype"),
        ({"dtype": ""}, "unknown dtype"),
        ({"shape": [4, 65]}, "codes hold"),
        ({"shape": [2**40, 2**40]}, "dimension above|exceeds"),
        ({"shape": [2**20] * 3}, "exceeds"),
        ({"shape": [1] * 9}, "dimensions"),
        ({"shape": [0, 2**62]}, "dimension above"),
        ({"block_size": 32}, "block_size"),
        ({"codec": "int8-block32"}, "block_size"),
        ({"codes": b"\x00" * 10}, "codes hold"),
        ({"scales": b"\x00" * 6}, "scales hold"),
        ({"scales": b"\xc0\x7f" * 4}, "finite"),
        ({"scales": b"\x80\xbf" * 4}, "non-negative"),
        ({"codec": "fp16", "block_size": 0}, "codes hold"),
    ],
)
def test_hostile_messages_rejected(changes, match):
    with pytest.raises(wire.WireFormatError, match=match):
        wire.deserialize(_mutated(**changes))


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"version": 2}, "version"),
        ({"shape": [4, 65]}, "codes hold"),
        ({"shape": [2**40, 2**40]}, "dimension above|exceeds"),
        ({"shape": [1] * 9}, "dimensions"),
        ({"block_size": 64}, "block_size"),
        ({"codes": b"\x00" * 10}, "codes hold"),
        ({"scales": b"\x00" * 2}, "scales hold"),
    ],
)
def test_hostile_plain_float32_messages_rejected(changes, match):
    """The numpy path of codec "none" refuses what the general path refuses, with its reason."""
    msg = _mutated(codec_src="none", **changes)
    with pytest.raises(wire.WireFormatError, match=match):
        wire.deserialize(msg)
    with pytest.raises(wire.WireFormatError):  # its own shape checks may speak first
        wire.decode(msg, "hidden", hidden_size=64, max_tokens=1 << 20)


def test_plain_float32_nan_refused_by_the_checked_decode():
    msg = wire.encode(torch.tensor([[[1.0, float("nan")]]]), "none")
    with pytest.raises(wire.WireFormatError, match="NaN"):
        wire.decode(msg, "hidden", hidden_size=2, max_tokens=8)


def test_max_elements_enforced_before_allocation():
    msg = _good()
    with pytest.raises(wire.WireFormatError, match="exceeds"):
        wire.deserialize(msg, max_elements=100)
    with pytest.raises(wire.WireFormatError, match="exceeds the limit"):
        wire.decode_bytes(b"\x00" * 2000, max_bytes=1000)


def test_wrong_types_rejected():
    with pytest.raises(wire.WireFormatError):
        wire.from_proto(b"not a message")
    with pytest.raises(wire.WireFormatError):
        wire.decode_bytes("a string")
    assert issubclass(wire.WireFormatError, kernels.QuantizationError)
    assert issubclass(kernels.QuantizationError, ValueError)


def test_int8_code_minus_128_is_defined():
    msg = _good()
    msg.codes = b"\x80" * len(msg.codes)
    y = wire.deserialize(msg)
    assert bool(torch.isfinite(y).all())


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=400))
def test_random_bytes_never_crash(data):
    try:
        y = wire.decode_bytes(data)
    except wire.WireFormatError:
        return
    assert isinstance(y, torch.Tensor)


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_mutated_valid_messages_never_crash(data):
    codec = data.draw(st.sampled_from(CODECS))
    raw = bytearray(wire.encode_bytes(torch.randn(3, 40), codec))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    try:
        wire.decode_bytes(bytes(raw))
    except wire.WireFormatError:
        pass


def _activation(shape=(2, 3, 8), codec="int8-block64"):
    return wire.encode(torch.randn(*shape), codec)


@pytest.mark.parametrize(
    "shape, limits, match",
    [
        ((2, 3), {}, "must have shape"),
        ((2, 3, 9), {}, "hidden size 9"),
        ((0, 3, 8), {}, "is empty"),
        ((2, 4, 8), {"max_tokens": 7}, "more than this peer allows"),
        ((3, 3, 8), {"batch_size": 2}, "batch 3, expected 2"),
        ((2, 4, 8), {"seq_len": 3}, "4 positions, expected 3"),
    ],
)
def test_checked_decode_refuses_bad_shapes_before_decoding(shape, limits, match):
    msg = _activation(shape)
    msg.codes = b""  # never reached: the header alone is refused
    kwargs = {"hidden_size": 8, "max_tokens": 64, **limits}
    with pytest.raises(wire.WireFormatError, match=match):
        wire.decode(msg, "hidden", **kwargs)


def test_checked_decode_errors_are_bad_requests_naming_the_tensor():
    msg = _activation()
    msg.dtype = "int64"
    with pytest.raises(BadRequest, match="hidden is not a valid tensor: unknown dtype"):
        wire.decode(msg, "hidden", hidden_size=8, max_tokens=64)
    with pytest.raises(BadRequest, match="grad_output is missing"):
        wire.decode(tensor_pb2.Tensor(), "grad_output", hidden_size=8, max_tokens=64)
    x = torch.randn(2, 3, 8)
    x[1, 2, 0] = float("inf")
    with pytest.raises(BadRequest, match="NaN or infinite"):
        wire.decode(wire.encode(x, "none"), "hidden", hidden_size=8, max_tokens=64)
    y = wire.decode(wire.encode(x[:1], "none"), "hidden", hidden_size=8, max_tokens=64)
    assert torch.equal(y, x[:1])


def test_client_takes_replies_through_the_checked_decode():
    like = torch.randn(2, 3, 8, dtype=torch.float16)
    reply = wire.encode(like.float() * 2, "int8-block64")
    out = _decoded(reply, like, "QmPeer")
    assert out.dtype == torch.float16 and out.shape == like.shape
    # Wrong shape or a forged header: the peer's fault, so the caller routes around it.
    for bad in [_activation((2, 4, 8)), _activation((1, 6, 8))]:
        with pytest.raises(PeerUnavailable, match="peer QmPeer replied with a bad tensor"):
            _decoded(bad, like, "QmPeer")
    forged = wire.encode(like, "none")
    forged.codes = forged.codes[:-2]
    with pytest.raises(PeerUnavailable, match="codes hold"):
        _decoded(forged, like, "QmPeer")
