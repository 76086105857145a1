"""4-bit linear layers for our blocks (`--quant nf4|fp4|int4`): QLoRA-style block-wise codes.

Used by the loaders and the peer through swarm.model.quantize; the arithmetic lives in kernels.
"""

from __future__ import annotations

import torch
from torch import nn

import kernels
from swarm.model.int8 import FrozenWeightLinear


class FourBitLinear(nn.Module):
    """A frozen linear layer with 4-bit weights, dequantized on the fly at every call.

    kind: "nf4" (NormalFloat4, QLoRA's data type for normally distributed weights), "fp4"
    (E2M1) or "int4" (symmetric absmax integers). Blocks of 64 values, absmax double-quantized;
    about 0.516 bytes per parameter. Activations stay in float: no outlier split is needed.
    Inputs that require grad get gradients through the dequantized weight (FrozenWeightLinear).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, kind="nf4"):
        super().__init__()
        self.in_features, self.out_features, self.kind = in_features, out_features, kind
        n = in_features * out_features
        blocks = -(-n // kernels.FOURBIT_BLOCK)
        self.register_buffer("packed", torch.zeros(2 * -(-n // 4), dtype=torch.uint8))
        self.register_buffer("absmax_codes", torch.zeros(blocks, dtype=torch.uint8))
        scales = -(-blocks // kernels.FOURBIT_ABSMAX_BLOCK)
        self.register_buffer("absmax_scales", torch.zeros(scales, dtype=torch.float32))
        self.register_buffer("absmax_mean", torch.zeros((), dtype=torch.float32))
        # Input columns kept in float16 (calibrated weights' outliers); None: none (and absent
        # from the state dict, as a missing bias is).
        self.register_buffer("kept_cols", None)
        self.register_buffer("kept_values", None)
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, kind: str = "nf4") -> FourBitLinear:
        """Round-to-nearest codes of the layer's weight (no calibration)."""
        w = kernels.quantize_4bit(linear.weight.detach(), kind)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls.from_weight(w, bias)

    @classmethod
    def from_weight(
        cls, w: kernels.FourBitWeight, bias: torch.Tensor | None = None
    ) -> FourBitLinear:
        """A layer holding already quantized weights w [out, in] (e.g. GPTQ's, kernels.gptq)."""
        out_features, in_features = w.shape
        q = cls(in_features, out_features, bias is not None, w.kind)
        q.packed, q.absmax_codes = w.packed, w.absmax_codes
        q.absmax_scales, q.absmax_mean = w.absmax_scales, w.absmax_mean
        if w.kept:
            q.kept_cols, q.kept_values = w.kept_cols, w.kept_values
        if bias is not None:
            q.bias = bias
        return q

    @property
    def weight(self) -> kernels.FourBitWeight:
        return kernels.FourBitWeight(
            self.packed,
            self.absmax_codes,
            self.absmax_scales,
            self.absmax_mean,
            (self.out_features, self.in_features),
            self.kind,
            self.kept_cols,
            self.kept_values,
        )

    @property
    def nbytes(self) -> int:
        bias = 0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        return self.weight.nbytes + bias

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The [out, in] float weight the codes stand for."""
        return self.weight.dequantize(dtype)

    def quantized_forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.fourbit_linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return FrozenWeightLinear.apply(x, self)
        return self.quantized_forward(x)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, kind={self.kind}"
        )
