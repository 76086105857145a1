"""Every remote block as one autograd op: forward and fine-tuning backward through the swarm.

Used by DistributedModelForCausalLM.forward (training); failed spans retry on other replicas.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any

import torch

from petals_like.routing import Hop
from petals_like.session import is_peer_failure
from petals_like.tuning import RemoteTuning
from swarm.errors import PeerUnavailable
from swarm.model.lora import AdapterPayload, BlockTensors

logger = logging.getLogger(__name__)

CALL_TIMEOUT = 120.0  # bound on one forward or backward call (probes find a dead peer sooner)


@dataclass
class StepTrace:
    """What one forward through the swarm kept for its backward."""

    seed: int
    hops: list[tuple[Hop, torch.Tensor]] = field(default_factory=list)  # each hop and its input
    payloads: dict[tuple[int, int], AdapterPayload | None] = field(default_factory=dict)


class RemoteBlocks:
    """Runs hidden states through blocks [0, num_blocks) on the swarm, and back.

    router: the SwarmRouter (routes, bans, probes); tuning: the adapter sent with each span.
    max_retries: re-routes allowed per step (forward and backward together).
    """

    def __init__(self, router: Any, tuning: RemoteTuning | None, max_retries: int = 8):
        self.router, self.tuning, self.max_retries = router, tuning, max_retries
        self.retries = 0  # re-routes since creation (all steps)
        self._moved = 0  # activations and gradients sent and received
        self._step_retries = 0
        self._rng = random.Random()
        self.last_trace: StepTrace | None = None  # of the last forward (tests, benchmarks)

    @property
    def client(self) -> Any:
        return self.router.client

    @property
    def wire_bytes(self) -> int:
        """Activations, gradients and adapter tensors sent and received (approximate)."""
        return self._moved + getattr(self.client, "adapter_bytes_sent", 0)

    def new_trace(self) -> StepTrace:
        self._step_retries = 0
        spec = self.tuning.spec if self.tuning is not None else None
        seed = self._rng.randrange(1, 1 << 62) if spec is not None and spec.dropout > 0 else 0
        self.last_trace = StepTrace(seed)
        return self.last_trace

    def _payload(self, trace: StepTrace, hop: Hop) -> AdapterPayload | None:
        key = (hop.start, hop.end)
        if key not in trace.payloads:
            t = self.tuning
            trace.payloads[key] = t.payload(hop.start, hop.end, trace.seed) if t else None
        return trace.payloads[key]

    async def _fail(self, hop: Hop, error: BaseException, what: str) -> list[Hop]:
        self.retries += 1
        self._step_retries += 1
        logger.warning(
            "%s of blocks %d:%d failed on peer ...%s (%s); retrying on another replica",
            what,
            hop.start,
            hop.end,
            str(hop.peer_id)[-6:],
            error,
        )
        self.router.report_failure(hop.peer_id, error)
        if self._step_retries > self.max_retries:
            raise PeerUnavailable(
                f"gave up after {self.max_retries} retries in one step; last: blocks "
                f"{hop.start}:{hop.end} ({error})"
            ) from error
        return await self.router.route(hop.start, hop.end, 0)

    async def _guarded(self, hop: Hop, work, n_tokens: int):
        probe_after = max(1.0, self.router.probe_after(hop.peer_id, n_tokens))
        return await self.router.guarded(hop.peer_id, work, CALL_TIMEOUT, probe_after)

    async def forward(self, hidden: torch.Tensor, trace: StepTrace) -> torch.Tensor:
        """Blocks [0, num_blocks) on `hidden` [B, T, H]; fills `trace` for the backward."""
        hops = await self.router.route(0, self.router.num_blocks, 0)
        return await self._forward_hops(hops, hidden, trace, trace.hops)

    async def _forward_hops(self, hops, x, trace: StepTrace, out: list) -> torch.Tensor:
        i = 0
        while i < len(hops):
            hop = hops[i]
            try:
                y = await self._forward_hop(hop, x, trace)
            except Exception as e:
                if not is_peer_failure(e):
                    raise
                hops[i : i + 1] = await self._fail(hop, e, "forward")
                continue
            out.append((hop, x))
            x = y
            i += 1
        return x

    async def _forward_hop(self, hop: Hop, x: torch.Tensor, trace: StepTrace) -> torch.Tensor:
        payload = self._payload(trace, hop)
        codec = self.router.codec_for(hop.peer_id)
        work = self.client.forward(
            hop.peer_id, x, hop.start, hop.end, CALL_TIMEOUT, codec=codec, adapter=payload
        )
        y = await self._guarded(hop, work, x.shape[0] * x.shape[1])
        self._moved += 2 * _nbytes(x, codec)
        return y

    async def backward(
        self, trace: StepTrace, grad: torch.Tensor
    ) -> tuple[torch.Tensor, BlockTensors]:
        """Gradient w.r.t. the forward's input and every adapter tensor, hop by hop backwards."""
        return await self._backward_hops(trace.hops, grad, trace)

    async def _backward_hops(self, hops, grad, trace: StepTrace):
        grads: BlockTensors = {}
        for hop, x in reversed(hops):
            try:
                grad, g = await self._backward_hop(hop, x, grad, trace)
            except Exception as e:
                if not is_peer_failure(e):
                    raise
                # Another replica recomputes the span: forward over its new hops, then back.
                new = await self._fail(hop, e, "backward")
                sub: list = []
                await self._forward_hops(new, x, trace, sub)
                grad, g = await self._backward_hops(sub, grad, trace)
            for b, ts in g.items():
                grads.setdefault(b, {}).update(ts)
        return grad, grads

    async def _backward_hop(self, hop: Hop, x, grad, trace: StepTrace):
        payload = self._payload(trace, hop)
        codec = self.router.codec_for(hop.peer_id)
        n = x.shape[0] * x.shape[1]
        if payload is None:
            work = self.client.backward(
                hop.peer_id, x, grad, hop.start, hop.end, CALL_TIMEOUT, codec=codec
            )
            out, g = await self._guarded(hop, work, n), {}
        else:
            work = self.client.backward_tuned(
                hop.peer_id, x, grad, hop.start, hop.end, payload, CALL_TIMEOUT, codec=codec
            )
            out, g = await self._guarded(hop, work, n)
            self._moved += payload.nbytes  # gradients of the same size come back
        self._moved += 3 * _nbytes(x, codec)
        return out, g


def _nbytes(x: torch.Tensor, codec: str) -> int:
    """Approximate bytes of `x` on the wire under `codec` (int8 codecs: 1 byte per element)."""
    return x.numel() * (4 if codec == "none" else 1)


class RemoteBlocksFunction(torch.autograd.Function):
    """hidden, *adapter parameters -> hidden after every remote block (autograd through peers)."""

    @staticmethod
    def forward(ctx, hidden, blocks: RemoteBlocks, run, params_meta, *params):
        trace = blocks.new_trace()
        out = run(blocks.forward(hidden.detach(), trace))
        if out.is_inference():  # an in-process peer (tests): autograd cannot record those
            out = out.clone()
        ctx.blocks, ctx.run, ctx.trace, ctx.meta = blocks, run, trace, params_meta
        return out

    @staticmethod
    def backward(ctx, grad):
        grad_in, grads = ctx.run(ctx.blocks.backward(ctx.trace, grad.contiguous()))
        param_grads = []
        for b, name in ctx.meta:
            g = grads.get(b, {}).get(name)
            param_grads.append(g)
        return (grad_in, None, None, None, *param_grads)
