"""AdamW whose moment estimates may live in 8 bits (block-wise dynamic quantization).

Used by a training stage (its span's fp32 master weights) and by the trainer (embeddings, head).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from swarm.errors import BadRequest

# Block-wise dynamic codebook as in 8-bit optimizers (Dettmers et al., ICLR 2022); small blocks
# keep one outlier from flattening a whole tensor's moments.
STATE_CODEC = "dynamic8-block256"


@dataclass
class AdamConfig:
    """Hyperparameters of AdamW; the trainer publishes them so every stage steps alike."""

    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0  # the learning rate rises linearly to `lr` over this many steps

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step `step` (1-based)."""
        if self.warmup_steps <= 0:
            return self.lr
        return self.lr * min(1.0, step / self.warmup_steps)

    def to_wire(self) -> list[float]:
        return [self.lr, self.beta1, self.beta2, self.eps, self.weight_decay, self.warmup_steps]

    @classmethod
    def from_wire(cls, value: object) -> AdamConfig:
        if not isinstance(value, (list, tuple)) or len(value) < 5:
            raise BadRequest(f"bad optimizer config record: {value!r}")
        try:
            lr, b1, b2, eps, wd = (float(v) for v in value[:5])
        except (TypeError, ValueError) as e:
            raise BadRequest(f"bad optimizer config record: {value!r}") from e
        warmup = value[5] if len(value) > 5 else 0  # absent in version-1 records
        if not isinstance(warmup, int) or isinstance(warmup, bool) or not 0 <= warmup < 1 << 30:
            raise BadRequest(f"bad warm-up in optimizer config record: {value!r}")
        # NaN fails every comparison below, inf fails the upper bounds.
        if not (0 < lr <= 1 and 0 <= b1 < 1 and 0 <= b2 < 1 and 0 < eps <= 1 and 0 <= wd <= 1):
            raise BadRequest(
                "optimizer config out of range (need 0 < lr <= 1, betas in [0, 1), "
                f"0 < eps <= 1, weight decay in [0, 1]): {value!r}"
            )
        return cls(lr, b1, b2, eps, wd, warmup)


def _quantize(x: torch.Tensor):
    from kernels.codecs import quantize

    return quantize(x, STATE_CODEC)


def _dequantize(q) -> torch.Tensor:
    from kernels.codecs import dequantize

    return dequantize(q)


class AdamW:
    """AdamW over a fixed list of fp32 parameters, stepping on their `.grad`.

    eight_bit: keep exp_avg and exp_avg_sq quantized between steps (about 2 bytes per parameter
    instead of 8); they are dequantized for the update and requantized after it.
    """

    def __init__(
        self, params: Sequence[torch.nn.Parameter], config: AdamConfig, eight_bit: bool = False
    ) -> None:
        self.params = list(params)
        self.config = config
        self.eight_bit = eight_bit
        self.step_count = 0
        self._m = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]
        self._v = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]
        if eight_bit:
            self._m = [_quantize(m) for m in self._m]
            self._v = [_quantize(v) for v in self._v]

    @torch.no_grad()
    def step(self, grads: Sequence[torch.Tensor | None] | None = None) -> None:
        """One AdamW update from `grads` (default: each parameter's `.grad`; None skips one)."""
        c = self.config
        self.step_count += 1
        lr = c.lr_at(self.step_count)
        bias1 = 1 - c.beta1**self.step_count
        bias2 = 1 - c.beta2**self.step_count
        if grads is None:
            grads = [p.grad for p in self.params]
        for i, (p, grad) in enumerate(zip(self.params, grads, strict=True)):
            if grad is None:
                continue
            g = grad.float()
            m = _dequantize(self._m[i]) if self.eight_bit else self._m[i]
            v = _dequantize(self._v[i]) if self.eight_bit else self._v[i]
            m.mul_(c.beta1).add_(g, alpha=1 - c.beta1)
            v.mul_(c.beta2).addcmul_(g, g, value=1 - c.beta2)
            if c.weight_decay:
                p.mul_(1 - lr * c.weight_decay)
            denom = (v / bias2).sqrt_().add_(c.eps)
            p.addcdiv_(m, denom, value=-lr / bias1)
            if self.eight_bit:
                self._m[i], self._v[i] = _quantize(m), _quantize(v)

    def state_bytes(self) -> int:
        """Bytes the moment estimates take in memory."""
        if self.eight_bit:
            return sum(q.nbytes for q in self._m + self._v)
        return sum(t.numel() * 4 for t in self._m + self._v)

    def state_tensors(self) -> list[torch.Tensor]:
        """The moments as plain tensors (codes and scales when 8-bit), for download by a peer."""
        if not self.eight_bit:
            return [t.clone() for t in self._m + self._v]
        out = []
        for q in self._m + self._v:
            out += [q.codes.clone(), q.scales.clone()]
        return out

    def load_state_tensors(self, tensors: Sequence[torch.Tensor], step_count: int) -> None:
        """Inverse of `state_tensors` (same parameter shapes and `eight_bit` on both sides)."""
        per = 2 if self.eight_bit else 1
        if len(tensors) != 2 * per * len(self.params) or step_count < 0:
            raise BadRequest(
                f"optimizer state has {len(tensors)} tensors, expected "
                f"{2 * per * len(self.params)} (is the other side's --optim-8bit the same?)"
            )
        n = len(self.params)
        if not self.eight_bit:
            for dst, src in zip(self._m + self._v, tensors, strict=True):
                if dst.shape != src.shape:
                    raise BadRequest(f"optimizer state shape {tuple(src.shape)} != {dst.shape}")
                dst.copy_(src)
        else:
            new = []
            for j, q in enumerate(self._m + self._v):
                codes, scales = tensors[2 * j], tensors[2 * j + 1]
                if codes.shape != q.codes.shape or scales.shape != q.scales.shape:
                    raise BadRequest("8-bit optimizer state has the wrong shape")
                if codes.dtype != q.codes.dtype or scales.dtype != q.scales.dtype:
                    raise BadRequest(
                        f"8-bit optimizer state has dtypes {codes.dtype}/{scales.dtype}, "
                        f"expected {q.codes.dtype}/{q.scales.dtype}"
                    )
                new.append(
                    type(q)(q.codec, q.shape, q.dtype, codes.clone(), scales.clone(), q.block_size)
                )
            self._m, self._v = new[:n], new[n:]
        self.step_count = step_count


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 distance of b from a (used by tests and the bench)."""
    return float((a - b).norm() / max(a.norm().item(), math.ulp(1.0)))
