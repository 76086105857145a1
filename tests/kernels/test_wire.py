"""Tests of the tensor wire format (kernels.wire, proto/tensor.proto): round trips, hostile input.

Run by pytest (tests/kernels).
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kernels
from proto import tensor_pb2

CODECS = ["int8-row", "int8-block64", "dynamic8-block256", "fp16", "bf16", "none"]


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_matches_in_memory(codec, dtype):
    torch.manual_seed(0)
    x = torch.randn(3, 4, 100).to(dtype)
    expected = kernels.dequantize(kernels.quantize(x, codec))
    msg = kernels.serialize(x, codec)
    assert isinstance(msg, tensor_pb2.Tensor)
    assert torch.equal(kernels.deserialize(msg), expected)
    assert torch.equal(kernels.decode_bytes(kernels.encode_bytes(x, codec)), expected)
    q = kernels.from_proto(msg)
    assert q.nbytes == kernels.quantize(x, codec).nbytes


def test_empty_and_scalar_round_trip():
    for x in [torch.empty(0, 7), torch.tensor(1.5)]:
        for codec in CODECS:
            y = kernels.decode_bytes(kernels.encode_bytes(x, codec))
            assert y.shape == x.shape


def test_nested_in_another_message_bytes_size():
    x = torch.randn(64, 1024)
    msg = kernels.serialize(x, "int8-block64")
    assert len(msg.SerializeToString()) < x.numel() * 1.04


def _good(codec="int8-block64"):
    return kernels.serialize(torch.randn(4, 64), codec)


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
    with pytest.raises(kernels.WireFormatError, match=match):
        kernels.deserialize(_mutated(**changes))


def test_max_elements_enforced_before_allocation():
    msg = _good()
    with pytest.raises(kernels.WireFormatError, match="exceeds"):
        kernels.deserialize(msg, max_elements=100)
    with pytest.raises(kernels.WireFormatError, match="exceeds the limit"):
        kernels.decode_bytes(b"\x00" * 2000, max_bytes=1000)


def test_wrong_types_rejected():
    with pytest.raises(kernels.WireFormatError):
        kernels.from_proto(b"not a message")
    with pytest.raises(kernels.WireFormatError):
        kernels.decode_bytes("a string")
    assert issubclass(kernels.WireFormatError, kernels.QuantizationError)
    assert issubclass(kernels.QuantizationError, ValueError)


def test_int8_code_minus_128_is_defined():
    msg = _good()
    msg.codes = b"\x80" * len(msg.codes)
    y = kernels.deserialize(msg)
    assert bool(torch.isfinite(y).all())


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=400))
def test_random_bytes_never_crash(data):
    try:
        y = kernels.decode_bytes(data)
    except kernels.WireFormatError:
        return
    assert isinstance(y, torch.Tensor)


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_mutated_valid_messages_never_crash(data):
    codec = data.draw(st.sampled_from(CODECS))
    raw = bytearray(kernels.encode_bytes(torch.randn(3, 40), codec))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    try:
        kernels.decode_bytes(bytes(raw))
    except kernels.WireFormatError:
        pass
