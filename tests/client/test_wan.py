"""Tests of petals_like.wan: every request pays the delay each way, and nothing else changes."""

import time

import pytest
import torch

from petals_like.router import RouterConfig, SwarmRouter
from petals_like.session import RemoteInferenceSession
from petals_like.wan import with_delay
from swarm.errors import BadRequest
from tests.client.conftest import FakeClient

DELAY = 0.05


@pytest.mark.timeout(30)
async def test_pings_opens_and_steps_pay_the_delay(fake_swarm, tiny_model):
    fake_swarm.add("a", 0, 3)
    fake_swarm.add("b", 3, 6)
    router = SwarmRouter(
        None,
        with_delay(FakeClient(fake_swarm), DELAY),
        "tiny",
        tiny_model.config.num_layers,
        config=RouterConfig(update_period=3600.0),
        fetch=fake_swarm.fetch,
    )
    await router.start()
    assert min(router.rtts.values()) >= 2 * DELAY
    session = RemoteInferenceSession(router, max_length=8)
    x = torch.randn(1, 5, tiny_model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    got = [await session.step(x[:, :4])]
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    got.append(await session.step(x[:, 4:]))
    second = time.perf_counter() - t0
    await session.close()
    await router.close()
    # A chain of two hops: every step pays a round trip per hop (the first one, the opens too).
    assert first >= 2 * (2 * DELAY) and second >= 2 * (2 * DELAY)
    with torch.inference_mode():
        want = tiny_model.span(x, 0, tiny_model.span.new_caches(1, 8))
    torch.testing.assert_close(torch.cat(got, dim=1), want, rtol=1e-3, atol=1e-3)


def test_no_delay_is_the_client_itself(fake_swarm):
    client = FakeClient(fake_swarm)
    assert with_delay(client, 0.0) is client
    with pytest.raises(BadRequest, match="delay"):
        with_delay(client, -1.0)
