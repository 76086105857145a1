"""Tests of petals_like.remote_blocks: autograd through fake peers, a replica retried mid-step."""

from __future__ import annotations

import copy

import pytest
import torch

from petals_like.model import DistributedModelForCausalLM
from petals_like.tuning import RemoteTuning, TuningConfig
from swarm.errors import PeerUnavailable
from swarm.peer.backend import SpanBackend
from tests.client.conftest import FakeClient, FakeSwarm

IDS = torch.tensor([[5, 17, 42, 8, 60, 11, 9, 23]])


class TrainClient(FakeClient):
    """FakeClient with the stateless calls, run by a real SpanBackend; peers can fail them."""

    def __init__(self, swarm: FakeSwarm):
        super().__init__(swarm)
        self.backend = SpanBackend(copy.deepcopy(swarm.model.span))
        self.fail_backward: set[str] = set()
        self.calls: list[tuple[str, str, int, int]] = []

    def _check(self, peer_id, what, first, last):
        self.calls.append((what, peer_id, first, last))
        peer = self.swarm.peers[peer_id]
        if peer.dead or (what == "backward" and peer_id in self.fail_backward):
            peer.dead = True
            raise PeerUnavailable(f"peer {peer_id} died")

    async def forward(self, peer_id, x, first, last, timeout=30.0, codec=None, adapter=None):
        self._check(peer_id, "forward", first, last)
        seed = adapter.seed if adapter is not None else 0  # as the wire carries it
        return self.backend.forward(
            x, first, last, adapter, seed
        ).clone()  # not an inference tensor

    async def backward(self, peer_id, x, g, first, last, timeout=75.0, codec=None):
        self._check(peer_id, "backward", first, last)
        return self.backend.backward(x, g, first, last)

    async def backward_tuned(self, peer_id, x, g, first, last, adapter, timeout=75.0, codec=None):
        self._check(peer_id, "backward", first, last)
        return self.backend.backward_tuned(x, g, first, last, adapter, adapter.seed)


def model_on(swarm: FakeSwarm, tuning: str = "lora") -> DistributedModelForCausalLM:
    model = swarm.distributed_model(compression="none")
    client = TrainClient(swarm)
    model.router.client = client
    torch.manual_seed(0)
    t = RemoteTuning(swarm.model.config, TuningConfig(tuning, rank=2, targets=["q", "down"]))
    with torch.no_grad():
        for p in t.parameters():
            p.normal_(0, 0.2)
    model.set_tuning(t)
    return model


def grads(model) -> list[torch.Tensor]:
    loss, _ = model(IDS, labels=IDS)
    loss.backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.timeout(60)
def test_a_peer_lost_in_the_backward_is_replaced_and_gradients_agree(fake_swarm):
    fake_swarm.add("a", 0, 3)
    fake_swarm.add("b", 3, 6)
    fake_swarm.add("c", 3, 6)
    want_model = model_on(fake_swarm)
    try:
        want = grads(want_model)
    finally:
        want_model.close()
    model = model_on(fake_swarm)
    try:
        model.router.client.fail_backward = {"b", "c"}
        # The backward of 3:6 fails once; the replacement redoes its forward, then backward.
        model._blocks.max_retries = 1
        with pytest.raises(PeerUnavailable):
            grads(model)
        model.router.client.fail_backward = set()
        for p in model.parameters():
            p.grad = None
        for peer in fake_swarm.peers.values():
            peer.dead = False
        model.router.bans = type(model.router.bans)(60.0, 2.0, 600.0)
        client = model.router.client
        model._blocks.max_retries = 8
        loss, _ = model(IDS, labels=IDS)
        used = next(p for w, p, s, _ in client.calls[::-1] if w == "forward" and s == 3)
        client.fail_backward = {used}
        loss.backward()
        got = [p.grad.clone() for p in model.parameters()]
        assert model._blocks.retries >= 1
        spans = [(w, p) for w, p, s, _ in client.calls if s == 3]
        other = ({"b", "c"} - {used}).pop()
        assert spans[-2:] == [("forward", other), ("backward", other)]
        for g, w in zip(got, want, strict=True):
            assert torch.allclose(g, w, atol=1e-6)
    finally:
        model.close()


@pytest.mark.timeout(60)
def test_retries_are_bounded(fake_swarm):
    fake_swarm.add("a", 0, 3)
    for i in range(4):
        fake_swarm.add(f"r{i}", 3, 6)
    model = model_on(fake_swarm)
    model.router.client.fail_backward = {f"r{i}" for i in range(4)}
    model._blocks.max_retries = 2
    try:
        with pytest.raises(PeerUnavailable, match="gave up after 2 retries"):
            grads(model)
    finally:
        model.close()


@pytest.mark.timeout(60)
def test_embeddings_and_head_train_when_asked(fake_swarm):
    fake_swarm.add("a", 0, 6)
    model = fake_swarm.distributed_model(compression="none")
    model.router.client = TrainClient(fake_swarm)
    config = TuningConfig("ptune", pre_seq_len=2, train_embeddings=True, train_head=True)
    model.set_tuning(RemoteTuning(fake_swarm.model.config, config))
    try:
        params = model.parameters()
        parts = model.client_parts
        assert any(p is parts.lm_head.weight for p in params)
        assert any(p is parts.embed_tokens.weight for p in params)
        grads(model)
        assert parts.lm_head.weight.grad is not None and model.tuning.prompts.grad is not None
    finally:
        model.close()
        for p in fake_swarm.model.client.parameters():  # shared with other tests' fixtures
            p.requires_grad_(True)
            p.grad = None


@pytest.mark.timeout(60)
def test_lora_dropout_masks_agree_between_forward_and_backward(fake_swarm):
    from swarm.model import lora

    fake_swarm.add("a", 0, 3)
    fake_swarm.add("b", 3, 6)
    model = fake_swarm.distributed_model(compression="none")
    model.router.client = TrainClient(fake_swarm)
    torch.manual_seed(0)
    config = TuningConfig("lora", rank=2, dropout=0.3, targets=["q", "up"])
    t = RemoteTuning(fake_swarm.model.config, config)
    with torch.no_grad():
        for p in t.parameters():
            p.normal_(0, 0.2)
    model.set_tuning(t)
    reference = copy.deepcopy(t)
    try:
        got = grads(model)
        seed = model._blocks.last_trace.seed
    finally:
        model.close()
    assert seed != 0
    local = fake_swarm.model
    params: lora.BlockTensors = {}
    for b, name, p in reference.named_block_params(0, 6):
        params.setdefault(b, {})[name] = p
    with lora.applied(list(enumerate(local.span.blocks)), reference.spec, params, seed=seed):
        logits = local.client.logits(local.span(local.client.embed(IDS)))
    v = logits.shape[-1]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, v), IDS[:, 1:].reshape(-1))
    want = torch.autograd.grad(loss, list(reference.parameters()))
    for g, w in zip(got, want, strict=True):
        assert torch.allclose(g, w, atol=1e-6)
