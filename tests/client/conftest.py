"""Fixtures of the client's tests: an in-process fake swarm (real blocks, fake transport).

Used by tests/client/test_*.py; the multi-process scenarios use the peer's fixtures instead.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from petals_like.loop import BackgroundLoop
from petals_like.model import DistributedModelForCausalLM
from petals_like.router import RouterConfig, SwarmRouter
from swarm.errors import PeerUnavailable
from swarm.model.config import ModelConfig
from swarm.model.llama import LlamaModel
from swarm.peer.records import SpanRecord

# Tiny tensors: one intra-op thread avoids spinning against the peers' processes on 2 cores.
torch.set_num_threads(1)


def tiny_config(num_layers: int = 6) -> ModelConfig:
    return ModelConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_layers=num_layers,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=256,
        eos_token_id=[3],
        name="tiny",
    )


class FakeStream:
    """A peer's session computed in-process with the real blocks; can die or hang on demand."""

    def __init__(self, peer: FakePeer, first: int, last: int, max_length: int, batch: int):
        self.peer, self.first, self.last = peer, first, last
        self.caches = peer.model.span.new_caches(batch, max_length)
        self.length = 0
        self.closed = False
        self.positions: list[tuple[int, int]] = []  # (position, tokens) of every step

    async def step(self, hidden: torch.Tensor, position: int, timeout: float = 30.0):
        peer = self.peer
        peer.steps += 1
        if peer.dead or self.closed:
            raise PeerUnavailable(f"peer {peer.peer_id} is gone")
        if peer.die_after is not None and peer.steps > peer.die_after:
            peer.dead = True
            raise PeerUnavailable(f"peer {peer.peer_id} died")
        if peer.hang_after is not None and peer.steps > peer.hang_after:
            if peer.hang_once:
                peer.hang_after = None
            await asyncio.sleep(3600)
        if peer.vanish_after is not None and peer.steps > peer.vanish_after:
            # A SIGKILLed peer whose p2pd lives on: the stream stays open, nothing comes back.
            peer.dead = True
            await asyncio.sleep(3600)
        if position > self.length:
            raise RuntimeError(f"position {position} skips ahead of {self.length}")
        self.positions.append((position, hidden.shape[1]))
        with torch.inference_mode():
            out = peer.model.span(hidden, position, self.caches, self.first, self.last)
        self.length = position + hidden.shape[1]
        return out.clone()

    async def close(self) -> None:
        self.closed = True


class FakePeer:
    def __init__(self, peer_id: str, start: int, end: int, model: LlamaModel, rps: float = 100.0):
        self.peer_id, self.start, self.end, self.model = peer_id, start, end, model
        self.rps = rps
        self.dead = False
        self.die_after: int | None = None
        self.hang_after: int | None = None
        self.vanish_after: int | None = None
        self.hang_once = False
        self.steps = 0
        self.opened = 0
        self.streams: list[FakeStream] = []

    def record(self) -> SpanRecord:
        return SpanRecord(
            self.peer_id,
            self.start,
            self.end,
            state="online",
            throughput=10.0,
            inference_rps=self.rps,
            cache_tokens_left=10_000,
            codecs=("none",),
        )


class FakeClient:
    """Stands in for swarm.peer.client.PeerClient."""

    def __init__(self, swarm: FakeSwarm):
        self.swarm = swarm

    async def info(self, peer_id: str, timeout: float = 10.0):
        peer = self.swarm.peers[peer_id]
        if peer.dead:
            raise PeerUnavailable("gone")
        return peer.record()

    async def open_inference(
        self, peer_id, first, last, max_length, batch_size=1, timeout=10.0, codec=None
    ):
        peer = self.swarm.peers[peer_id]
        self.swarm.dials.append(peer_id)
        self.swarm.codecs.append(codec)
        if peer.dead:
            raise PeerUnavailable(f"peer {peer_id} is gone")
        if not peer.start <= first < last <= peer.end:
            raise RuntimeError(f"blocks {first}:{last} outside {peer.start}:{peer.end}")
        peer.opened += 1
        stream = FakeStream(peer, first, last, max_length, batch_size)
        peer.streams.append(stream)
        return stream


class FakeSwarm:
    """Peers of one tiny model; records stay 'online' after a peer dies (as on the DHT)."""

    def __init__(self, model: LlamaModel):
        self.model = model
        self.peers: dict[str, FakePeer] = {}
        self.dials: list[str] = []
        self.codecs: list[str | None] = []  # the codec each open named

    def add(self, peer_id: str, start: int, end: int, rps: float = 100.0) -> FakePeer:
        peer = FakePeer(peer_id, start, end, self.model, rps)
        self.peers[peer_id] = peer
        return peer

    async def fetch(self, dht, prefix, num_blocks, timeout):
        return [p.record() for p in self.peers.values()]

    def router(self, **config) -> SwarmRouter:
        cfg = RouterConfig(**{"update_period": 3600.0, **config})
        return SwarmRouter(
            None,
            FakeClient(self),
            "tiny",
            self.model.config.num_layers,
            config=cfg,
            fetch=self.fetch,
        )

    def distributed_model(self, **config) -> DistributedModelForCausalLM:
        loop = BackgroundLoop()
        router = self.router(**config)
        loop.run(router.start(), timeout=10)
        return DistributedModelForCausalLM(
            self.model.config, self.model.client, router, loop, model_prefix="tiny"
        )


@pytest.fixture
def tiny_model() -> LlamaModel:
    torch.manual_seed(0)
    model = LlamaModel(tiny_config()).eval()
    # Larger weights than the default init make logits far apart, so greedy choices are stable.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    return model


@pytest.fixture
def fake_swarm(tiny_model: LlamaModel) -> FakeSwarm:
    return FakeSwarm(tiny_model)
