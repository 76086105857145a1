"""LLM.int8() linear layers for our blocks: int8 weights, per-token int8 activations, fp outliers.

Used by the loaders (`--quant int8`) and the peer; the arithmetic lives in `kernels`.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

import kernels
from swarm.model.llama import Block

logger = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 6.0


class Int8Linear(nn.Module):
    """A frozen linear layer with int8 weights (absmax per output row) for inference.

    threshold: input feature columns with any |x| >= threshold are multiplied in floating point
    (LLM.int8()'s mixed-precision decomposition); threshold <= 0 sends everything through int8.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        threshold: float = DEFAULT_THRESHOLD,
    ):
        super().__init__()
        self.in_features, self.out_features, self.threshold = in_features, out_features, threshold
        self.register_buffer("codes", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.zeros(out_features, dtype=torch.float32))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

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
        return kernels.Int8Weight(self.codes, self.scales)

    @property
    def nbytes(self) -> int:
        bias = 0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        return self.weight.nbytes + bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.int8_linear(x, self.weight, self.bias, self.threshold)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, threshold={self.threshold}"
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
