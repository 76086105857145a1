"""Tests of swarm.peer.adapters and the adapter messages of swarm.peer.wire: checks and bounds."""

from __future__ import annotations

import pytest
import torch

from swarm.errors import AdapterMissing, BadRequest, CacheFull
from swarm.model import lora
from swarm.model.config import ModelConfig
from swarm.peer import wire
from swarm.peer.adapters import AdapterCache


def config() -> ModelConfig:
    return ModelConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=48,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
    )


SPEC = lora.AdapterSpec(rank=2, alpha=4.0, targets=("q_proj", "down_proj"))


def tensors(spec=SPEC, blocks=(1, 2), seed=0, shapes=None, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    shapes = shapes or lora.block_shapes(config(), spec)
    return {
        b: {n: torch.randn(s, generator=g).to(dtype) for n, s in shapes.items()} for b in blocks
    }


def cache(**kw) -> AdapterCache:
    args = {"max_bytes": 1 << 20, "max_entries": 4, "max_rank": 8, "max_pre_seq_len": 16, **kw}
    return AdapterCache(config(), **args)


def put(c, spec=SPEC, ts=None, first=1, last=3):
    ts = ts if ts is not None else tensors(spec)
    return c.put(lora.adapter_hash(spec, ts), spec, ts, first, last)


def test_put_then_get_by_hash():
    c = cache()
    e = put(c)
    assert c.get(e.hash, 1, 3) is e and c.get(e.hash, 2, 3) is e
    with pytest.raises(BadRequest, match="covers blocks 1:3"):
        c.get(e.hash, 0, 2)
    with pytest.raises(AdapterMissing):
        c.get("f" * 64, 1, 3)


def test_bad_tensors_are_refused():
    c = cache()
    bad = {
        "q_proj.lora_A": (2, 31),
        "q_proj.lora_B": (32, 2),
        "down_proj.lora_A": (2, 48),
        "down_proj.lora_B": (32, 2),
    }
    with pytest.raises(BadRequest, match="expected float32"):
        put(c, ts=tensors(shapes=bad))
    with pytest.raises(BadRequest, match="expected float32"):
        put(c, ts=tensors(dtype=torch.float64))
    with pytest.raises(BadRequest, match="differ from"):
        ts = tensors()
        del ts[1]["q_proj.lora_A"]
        put(c, ts=ts)
    with pytest.raises(BadRequest, match="exactly"):
        put(c, ts=tensors(blocks=(1,)))
    with pytest.raises(BadRequest, match="cap of 8"):
        put(c, spec=lora.AdapterSpec(rank=9, targets=("q_proj",)))
    with pytest.raises(BadRequest, match="cap of 16"):
        put(c, spec=lora.AdapterSpec(pre_seq_len=17))
    ts = tensors()
    with pytest.raises(BadRequest, match="do not match its hash"):
        c.put("0" * 64, SPEC, ts, 1, 3)
    assert len(c) == 0


def test_memory_and_count_are_bounded_pinned_adapters_stay():
    one = put(cache()).nbytes
    c = cache(max_bytes=3 * one, max_entries=10)
    entries = [put(c, ts=tensors(seed=i)) for i in range(5)]
    assert len(c) == 3 and c.nbytes <= 3 * one  # the oldest were evicted
    for e in entries[2:]:
        c.pin(e)
    with pytest.raises(CacheFull, match="adapter cache full"):
        put(c, ts=tensors(seed=99))
    c.unpin(entries[2])
    put(c, ts=tensors(seed=99))
    assert c.nbytes <= 3 * one
    with pytest.raises(BadRequest, match="more than this peer's cache"):
        put(cache(max_bytes=one - 1))
    counted = cache(max_entries=2)
    for i in range(2):
        counted.pin(put(counted, ts=tensors(seed=i)))
    with pytest.raises(CacheFull):
        put(counted, ts=tensors(seed=5))


def test_wire_round_trip_and_refusals():
    ts = tensors()
    payload = lora.AdapterPayload(SPEC, ts, seed=5)
    msg = wire.adapter_to_wire(payload, with_tensors=True)
    spec, got, key, seed = wire.adapter_from_wire(msg, 1 << 16)
    assert spec == SPEC and key == payload.hash and seed == 5
    assert all(torch.equal(got[b][n], ts[b][n]) for b in ts for n in ts[b])
    spec, got, _, _ = wire.adapter_from_wire(wire.adapter_to_wire(payload, False), 1 << 16)
    assert got is None
    with pytest.raises(BadRequest, match="float32 with codec"):
        half = lora.AdapterPayload(SPEC, tensors(dtype=torch.float16))
        wire.adapter_from_wire(wire.adapter_to_wire(half, True), 1 << 16)
    with pytest.raises(BadRequest, match="not valid"):
        wire.adapter_from_wire(msg, 10)  # bounded before allocating
    with pytest.raises(BadRequest, match="more than this peer accepts"):
        wire.adapter_from_wire(msg, 1 << 16, max_total=100)
    msg.hash = "xyz"
    with pytest.raises(BadRequest, match="sha256"):
        wire.adapter_from_wire(msg, 1 << 16)
    msg = wire.adapter_to_wire(payload, with_tensors=True)
    msg.tensors.append(msg.tensors[0])
    with pytest.raises(BadRequest, match="twice"):
        wire.adapter_from_wire(msg, 1 << 16)


class FakeStub:
    """A peer's stub that records how each call came (unary or stream) and what it carried."""

    def __init__(self, forget_first: bool = False):
        self.calls: list[tuple[str, int]] = []  # (how, adapter tensors carried)
        self.forget_first = forget_first

    def _reply(self, request):
        from proto import peer_pb2

        if self.forget_first and not request.adapter.tensors:
            self.forget_first = False
            return peer_pb2.BackwardResponse(
                error=peer_pb2.Error(kind="AdapterMissing", message="evicted")
            )
        if request.adapter.tensors:
            self.held = list(request.adapter.tensors)  # what a peer caches
        return peer_pb2.BackwardResponse(grad_input=request.hidden, adapter_grads=self.held)

    async def rpc_backward(self, request, timeout):
        self.calls.append(("unary", len(request.adapter.tensors)))
        return self._reply(request)

    async def rpc_backward_stream(self, parts):
        from proto import peer_pb2

        request = await wire.join(parts, peer_pb2.BackwardRequest)
        self.calls.append(("stream", len(request.adapter.tensors)))
        reply = self._reply(request)

        async def out():
            for p in wire.split(reply):
                yield p

        return out()


def client_with(stub):
    from swarm.peer.client import PeerClient

    client = PeerClient(p2p=None)
    client._stub = lambda peer: stub
    return client


PEER = "12D3KooWRSrtAgMjDciZ9gDyPK1Qe69UHzHKZw9i5ipozd7DvF1L"


async def test_adapters_go_once_and_again_when_the_peer_lost_them():
    stub = FakeStub()
    client = client_with(stub)
    payload = lora.AdapterPayload(SPEC, tensors())
    x = torch.randn(1, 3, 32)
    for _ in range(2):
        grad, grads = await client.backward_tuned(PEER, x, x, 1, 3, payload)
        assert torch.equal(grad, x) and torch.equal(
            grads[1]["q_proj.lora_A"], tensors()[1]["q_proj.lora_A"]
        )
    assert stub.calls == [("unary", 8), ("unary", 0)]  # the second time by hash only
    stub.forget_first = True
    await client.backward_tuned(PEER, x, x, 1, 3, payload)
    assert stub.calls[2:] == [("unary", 0), ("unary", 8)]  # AdapterMissing: sent again


async def test_a_backward_whose_gradients_are_large_streams():
    big = lora.AdapterSpec(rank=8, targets=tuple(lora.TARGETS))
    ts = {
        b: {n: torch.zeros(s) for n, s in lora.block_shapes(config(), big).items()}
        for b in range(4)
    }
    payload = lora.AdapterPayload(big, ts)
    stub = FakeStub()
    client = client_with(stub)
    x = torch.randn(1, 3, 32)
    old = wire.UNARY_LIMIT_BYTES
    wire.UNARY_LIMIT_BYTES = payload.nbytes + (1 << 18)  # requests and replies fit unary
    try:
        await client.backward_tuned(PEER, x, x, 0, 4, payload)
        await client.backward_tuned(PEER, x, x, 0, 4, payload)
    finally:
        wire.UNARY_LIMIT_BYTES = old
    assert stub.calls == [("unary", 4 * len(lora.block_shapes(config(), big))), ("unary", 0)]
    wire.UNARY_LIMIT_BYTES = payload.nbytes // 2
    try:
        await client.backward_tuned(PEER, x, x, 0, 4, payload)
    finally:
        wire.UNARY_LIMIT_BYTES = old
    assert stub.calls[-1] == ("stream", 0)  # by hash, yet the reply is large: a stream


async def test_a_peer_that_ignores_the_adapter_is_unavailable():
    from proto import peer_pb2
    from swarm.errors import PeerUnavailable

    class OldPeer:  # predates adapters: the field is unknown to it, the reply is the base model's
        async def rpc_forward(self, request, timeout):
            return peer_pb2.ForwardResponse(hidden=request.hidden)

    client = client_with(OldPeer())
    x = torch.randn(1, 3, 32)
    assert torch.equal(await client.forward(PEER, x, 1, 3), x)
    with pytest.raises(PeerUnavailable, match="did not apply the adapter"):
        await client.forward(PEER, x, 1, 3, adapter=lora.AdapterPayload(SPEC, tensors()))
