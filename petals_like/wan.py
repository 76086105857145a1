"""User-space WAN emulation: a peer client whose every request pays a fixed delay each way.

Used by DistributedModelForCausalLM.from_pretrained (hop_delay, `swarm-generate --hop-delay`).
"""

from __future__ import annotations

import asyncio
from typing import Any

import torch

from swarm.errors import BadRequest


class DelayedStream:
    """An inference stream whose every step pays `delay` seconds each way."""

    def __init__(self, inner: Any, delay: float):
        self.inner, self.delay = inner, delay

    async def step(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        await asyncio.sleep(self.delay)
        out = await self.inner.step(*args, **kwargs)
        await asyncio.sleep(self.delay)
        return out

    async def close(self) -> None:
        await self.inner.close()


class DelayedClient:
    """Wraps a swarm.peer.client.PeerClient (what the router calls of it) with `delay` s each way.

    inner: the real client. delay: seconds before the request and again before its answer,
    as a network with a round trip of 2 * delay would add (no netem in this kernel). The router
    sees a slower network: its latency fit and timeouts need no branch for emulation.
    """

    def __init__(self, inner: Any, delay: float):
        if delay < 0:
            raise BadRequest(f"the hop delay must be >= 0 s, got {delay}")
        self.inner, self.delay = inner, delay

    # Arguments pass through untouched, so the wrapper follows PeerClient's signatures.
    async def info(self, *args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(self.delay)
        out = await self.inner.info(*args, **kwargs)
        await asyncio.sleep(self.delay)
        return out

    async def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return await self._delayed(self.inner.forward(*args, **kwargs))

    async def backward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return await self._delayed(self.inner.backward(*args, **kwargs))

    async def backward_tuned(self, *args: Any, **kwargs: Any) -> Any:
        return await self._delayed(self.inner.backward_tuned(*args, **kwargs))

    async def _delayed(self, work: Any) -> Any:
        await asyncio.sleep(self.delay)
        out = await work
        await asyncio.sleep(self.delay)
        return out

    async def open_inference(self, *args: Any, **kwargs: Any) -> DelayedStream:
        await asyncio.sleep(self.delay)
        stream = await self.inner.open_inference(*args, **kwargs)
        await asyncio.sleep(self.delay)
        return DelayedStream(stream, self.delay)


def with_delay(client: Any, delay: float) -> Any:
    """`client` itself when delay is 0, else a DelayedClient around it."""
    return DelayedClient(client, delay) if delay else client
