"""Swap the linear layers of a model's blocks for quantized ones, by `--quant` mode.

Used by the loaders (swarm.model.loading), the peer's throughput probe and the benchmarks.
"""

from __future__ import annotations

from torch import nn

from swarm.errors import BadRequest
from swarm.model.fourbit import FourBitLinear
from swarm.model.int8 import Int8Linear
from swarm.model.llama import Block
from swarm.quant import FOURBIT_MODES, QUANT_MODES

QUANTIZED_LINEARS = (Int8Linear, FourBitLinear)


def quantize_blocks_as(module: nn.Module, quant: str) -> nn.Module:
    """Replace, in place, every nn.Linear inside the `Block`s of `module` per `quant`.

    quant: one of swarm.quant.QUANT_MODES ("none" leaves the module alone); 4-bit modes get
    round-to-nearest codes here ("nf4" as "nf4-rtn": calibration is swarm.model.calibrate's).
    `module` may be a Block, a BlockSpan or a LlamaModel: the client's embeddings and head stay
    in float.
    """
    if quant not in QUANT_MODES:
        raise BadRequest(f"unknown quantization {quant!r}; choose one of {', '.join(QUANT_MODES)}")
    if quant == "none":
        return module
    for block in [m for m in module.modules() if isinstance(m, Block)]:
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if not isinstance(child, nn.Linear):
                    continue
                kind = quant.removesuffix("-rtn")
                if kind in FOURBIT_MODES:
                    setattr(parent, name, FourBitLinear.from_linear(child, kind))
                else:
                    setattr(parent, name, Int8Linear.from_linear(child))
    return module


def quantized_params(module: nn.Module) -> int:
    """Parameters a module stands for, quantized layers counted by their float shape."""
    n = sum(p.numel() for p in module.parameters())
    for m in module.modules():
        if isinstance(m, QUANTIZED_LINEARS):
            n += m.in_features * m.out_features + (0 if m.bias is None else m.out_features)
    return n
