"""Int8 linear layers for our blocks: row-wise int8 weights, weight-only or LLM.int8() matmuls.

Used by the loaders (`--quant int8`) and the peer; the arithmetic lives in `kernels`.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

import kernels
from swarm.model.llama import Block

logger = logging.getLogger(__name__)

# LLM.int8() uses 6.0 for models of 6.7B+ parameters; on SmolLM2-135M (Pride and Prejudice, 512-
# token windows) 6.0 cost +1.26% perplexity over fp32, 4.0 +0.50%, 0 (no split) +2.6%.
DEFAULT_THRESHOLD = 4.0


class FrozenWeightLinear(torch.autograd.Function):
    """y = module(x) with a gradient for x only: dy/dx through the frozen, dequantized weight.

    Used by Int8Linear and FourBitLinear when their input requires grad (fine-tuning a prompt or
    adapters in front of quantized blocks; a peer's backward). The weights get no gradient.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: nn.Module) -> torch.Tensor:
        ctx.module = module
        return module.quantized_forward(x)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        w = ctx.module.dequantized_weight(torch.float32)
        grad = grad_out.to(torch.float32) @ w
        return grad.to(grad_out.dtype), None


class Int8Linear(nn.Module):
    """A frozen linear layer with int8 weights (absmax per output row).

    threshold: on the LLM.int8() path, input feature columns with any |x| >= threshold are
    multiplied in floating point (its mixed-precision decomposition); threshold <= 0 sends
    everything through int8. The weight-only path (small batches) keeps activations in float
    and needs no such split.
    path: "auto" (weight-only up to kernels.weight_only_max_tokens rows, LLM.int8() above),
    "weight-only" or "int8"; see kernels.int8_linear.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        threshold: float = DEFAULT_THRESHOLD,
        path: str = "auto",
    ):
        super().__init__()
        self.in_features, self.out_features, self.threshold = in_features, out_features, threshold
        self.path = path
        self.register_buffer("codes", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.zeros(out_features, dtype=torch.float32))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        # (scales tensor, its version, kernels.pack_scales of it): see _pack_scales.
        self._pack_cache: tuple[torch.Tensor, int | None, torch.Tensor] | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, threshold: float = DEFAULT_THRESHOLD) -> Int8Linear:
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, threshold)
        w = kernels.quantize_weight(linear.weight.detach())
        q.codes, q.scales = w.codes, w.scales
        if linear.bias is not None:
            q.bias = linear.bias.detach().clone()
        return q

    @property
    def weight(self) -> kernels.Int8Weight:
        return kernels.Int8Weight(self.codes, self.scales, self._pack_scales())

    def _pack_scales(self) -> torch.Tensor | None:
        """The CPU kernel's bf16 scales, kept while `scales` is the same tensor, unchanged (a
        .to(), a new tensor or an in-place write makes them anew); None off the CPU."""
        s = self.scales
        if s.device.type != "cpu":
            return None
        version = None if s.is_inference() else s._version  # inference tensors keep none
        cached = self._pack_cache
        if cached is None or cached[0] is not s or cached[1] != version:
            cached = self._pack_cache = (s, version, kernels.pack_scales(s))
        return cached[2]

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._pack_cache = None  # copied in place: under inference mode no version tells
        super()._load_from_state_dict(*args, **kwargs)

    @property
    def nbytes(self) -> int:
        bias = 0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        return self.weight.nbytes + bias

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The [out, in] float weight the codes stand for."""
        return self.weight.dequantize(dtype)

    def quantized_forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.int8_linear(x, self.weight, self.bias, self.threshold, self.path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return FrozenWeightLinear.apply(x, self)
        return self.quantized_forward(x)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, threshold={self.threshold}, path={self.path}"
        )


def quantize_blocks(module: nn.Module, threshold: float = DEFAULT_THRESHOLD) -> nn.Module:
    """Replace, in place, every nn.Linear inside the `Block`s of `module` with an Int8Linear.

    `module` may be a Block, a BlockSpan or a LlamaModel: the client's head stays in float.
    """
    blocks = [m for m in module.modules() if isinstance(m, Block)]
    for block in blocks:
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, Int8Linear.from_linear(child, threshold))
    return module


def weight_bytes(module: nn.Module) -> int:
    """Bytes of the weights a module holds: parameters and persistent buffers (not RoPE tables)."""
    # Keyed by storage address so tied weights count once.
    tensors = {t.data_ptr(): t for t in module.state_dict(keep_vars=True).values()}
    return sum(t.numel() * t.element_size() for t in tensors.values())
