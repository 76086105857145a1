"""SpanBackend: the compute a peer offers (forward, backward, inference steps) over a BlockSpan.

Used by the compute worker (`swarm.peer.worker`). It is the seam for training: a SWARM training
peer subclasses SpanBackend and overrides `backward` to keep parameter gradients (run the span
with parameters that require grad, accumulate, step elsewhere) and `load_state` to swap weights;
the handler, worker and announcer stay as they are.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import torch

from swarm.model import lora
from swarm.model.llama import Block, BlockSpan, KVCache, apply_rope, rope_cos_sin

logger = logging.getLogger(__name__)


@dataclass
class Session:
    """One client's inference session: its caches for blocks [first, last) and how far it got."""

    session_id: str
    first: int
    last: int
    max_length: int
    batch_size: int
    caches: list[KVCache]
    backend: SpanBackend  # the span it was opened on: a rebalancing move does not break it
    length: int = 0  # positions [0, length) are in the caches
    tokens: int = 0  # what it holds of the cache budget
    reply_codec: str = "none"
    adapter: Any = None  # the swarm.peer.adapters.AdapterEntry its steps run with, if any

    @property
    def adapter_key(self) -> str:
        return self.adapter.hash if self.adapter is not None else ""


@dataclass
class StepItem:
    """One inference step of one session, as the worker batches them."""

    session: Session
    hidden: torch.Tensor  # [B, T, H]
    position: int


class SpanBackend:
    """Runs blocks [first, last) of a span for forward, backward and inference steps.

    Every method runs on the compute worker's thread, never on the event loop.
    """

    serves_adapters = True  # fine-tuning clients' adapters run on these (frozen) weights

    def __init__(self, span: BlockSpan, dtype: torch.dtype = torch.float32):
        self.span = span.eval()
        self.dtype = dtype
        self.config = span.config
        for p in self.span.parameters():
            p.requires_grad_(False)

    @property
    def start(self) -> int:
        return self.span.start

    @property
    def end(self) -> int:
        return self.span.end

    def forward(
        self, hidden: torch.Tensor, first: int, last: int, adapter: Any = None, seed: int = 0
    ) -> torch.Tensor:
        """Stateless forward of blocks [first, last) from position 0, with a client's adapter."""
        with torch.inference_mode(), self._adapted(adapter, first, last, seed):
            out = self.span(hidden.to(self.dtype), 0, None, first, last)
        return out.to(hidden.dtype)

    def backward_tuned(
        self,
        hidden: torch.Tensor,
        grad_output: torch.Tensor,
        first: int,
        last: int,
        adapter: Any,
        seed: int = 0,
    ) -> tuple[torch.Tensor, lora.BlockTensors]:
        """Fine-tuning backward: the input's and the adapter's gradients; base weights stay.

        Recomputes blocks [first, last) on `hidden` with the adapter (an AdapterEntry) hooked
        in; gradients reach the input through frozen int8 linears too (QLoRA).
        """
        with torch.enable_grad():
            x = hidden.detach().to(self.dtype).requires_grad_(True)
            params = {
                b: {
                    n: t.detach().clone().requires_grad_(True)
                    for n, t in adapter.tensors[b].items()
                }
                for b in range(first, last)
            }
            flat = [t for b in sorted(params) for _, t in sorted(params[b].items())]
            with lora.applied(self._span_blocks(first, last), adapter.spec, params, seed, True):
                out = self.span(x, 0, None, first, last)
            grads = torch.autograd.grad(
                out, [x, *flat], grad_output.to(out.dtype), allow_unused=True
            )
        grad_in = grads[0] if grads[0] is not None else torch.zeros_like(x)
        it = iter(grads[1:])
        out_grads: lora.BlockTensors = {}
        for b in sorted(params):
            for n, t in sorted(params[b].items()):
                g = next(it)
                out_grads.setdefault(b, {})[n] = torch.zeros_like(t) if g is None else g.detach()
        return grad_in.to(hidden.dtype), out_grads

    def _span_blocks(self, first: int, last: int) -> list[tuple[int, Block]]:
        return [(i, self.span.blocks[i - self.start]) for i in range(first, last)]

    def _adapted(self, adapter: Any, first: int, last: int, seed: int = 0):
        if adapter is None:
            return contextlib.nullcontext()
        blocks = self._span_blocks(first, last)
        return lora.applied(blocks, adapter.spec, adapter.tensors, seed)

    def backward(
        self, hidden: torch.Tensor, grad_output: torch.Tensor, first: int, last: int
    ) -> torch.Tensor:
        """Recompute blocks [first, last) on `hidden`; return d(output . grad_output)/d(hidden)."""
        # Frozen int8 linears have no autograd: hooks pass the gradient through their weights.
        with torch.enable_grad(), lora.applied(self._span_blocks(first, last), None, None, 0, True):
            x = hidden.detach().to(self.dtype).requires_grad_(True)
            out = self.span(x, 0, None, first, last)
            (grad,) = torch.autograd.grad(out, x, grad_output.to(out.dtype))
        return grad.to(hidden.dtype)

    def backward_counted(
        self,
        hidden: torch.Tensor,
        grad_output: torch.Tensor,
        first: int,
        last: int,
        deadline: float | None = None,
        step: int = 0,
    ) -> tuple[torch.Tensor, int]:
        """`backward`, and the optimizer step the gradient counts toward (0: none, not training).

        deadline: time.monotonic() after which a training peer must not count the gradient.
        step: the optimizer step a training peer should count it toward (0: the coming one).
        """
        return self.backward(hidden, grad_output, first, last), 0

    def load_state(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Replace the span's weights (training peers after an optimizer step or a download)."""
        self.span.load_state_dict(state_dict, strict=True)

    def new_caches(self, batch: int, max_length: int, first: int, last: int) -> list[KVCache]:
        """Caches of blocks [first, last) for one session (only the blocks it will use)."""
        caches = self.span.new_caches(batch, max_length, dtype=self.dtype)
        return caches[first - self.start : last - self.start]

    def inference_step(self, items: list[StepItem]) -> list[torch.Tensor]:
        """Run steps of sessions with equal (first, last, T): batched where the blocks allow.

        The weight matmuls run once on all sessions' rows; attention runs per session, since
        each has its own cache and positions.
        """
        s = items[0].session
        prompts = s.adapter is not None and s.adapter.has_prompts  # hooked on Block.forward
        if len(items) == 1 or prompts or not all(_batchable(b) for b in self._blocks(items[0])):
            return [self._step_one(it) for it in items]
        # The worker batches only sessions with the same adapter (its batch key).
        with torch.inference_mode(), self._adapted(s.adapter, s.first, s.last):
            return self._step_batched(items)

    def _blocks(self, item: StepItem) -> list[Block]:
        s = item.session
        return list(self.span.blocks[s.first - self.start : s.last - self.start])

    def _step_one(self, item: StepItem) -> torch.Tensor:
        s = item.session
        # Caches cover only [first, last): pad the list so BlockSpan indexes by span offset.
        caches = [None] * (s.first - self.start) + s.caches
        # dtype checks, not no-op casts: a torch call costs 25-90 us cold here
        x = item.hidden
        cast = x if x.dtype == self.dtype else x.to(self.dtype)
        with torch.inference_mode(), self._adapted(s.adapter, s.first, s.last):
            out = self.span(cast, item.position, caches, s.first, s.last)
        return out if out.dtype == x.dtype else out.to(x.dtype)

    def _step_batched(self, items: list[StepItem]) -> list[torch.Tensor]:
        t = items[0].hidden.shape[1]
        sizes = [it.hidden.shape[0] for it in items]
        x = torch.cat([it.hidden.to(self.dtype) for it in items])
        rope = []
        for it in items:
            positions = torch.arange(it.position, it.position + t)
            rope.append(rope_cos_sin(self.span.inv_freq, positions, self.dtype))
        for i, block in enumerate(self._blocks(items[0])):
            attn = block.self_attn
            h = block.input_layernorm(x)
            q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
            outs = []
            for it, (cos, sin), qi, ki, vi in zip(
                items, rope, q.split(sizes), k.split(sizes), v.split(sizes), strict=True
            ):
                outs.append(_attend(attn, qi, ki, vi, cos, sin, it.position, it.session.caches[i]))
            x = x + attn.o_proj(torch.cat(outs))
            x = x + block.mlp(block.post_attention_layernorm(x))
        return [y.to(it.hidden.dtype) for y, it in zip(x.split(sizes), items, strict=True)]


def _batchable(block: Block) -> bool:
    attn = getattr(block, "self_attn", None)
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "num_heads", "num_kv_heads", "head_dim")
    return attn is not None and all(hasattr(attn, n) for n in names)


def _attend(attn, q, k, v, cos, sin, start: int, cache: KVCache) -> torch.Tensor:
    """Attention of one session's rows, as llama.Attention does after its projections."""
    b, t, _ = q.shape
    q = q.view(b, t, attn.num_heads, attn.head_dim).transpose(1, 2)
    k = k.view(b, t, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
    v = v.view(b, t, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k, v = cache.update(start, k, v)
    q_pos = torch.arange(start, start + t)[:, None]
    mask = torch.arange(k.shape[2])[None, :] <= q_pos
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    return out.transpose(1, 2).reshape(b, t, -1)
