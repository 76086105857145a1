"""Bounds on the gradients a training stage accepts: finite, and not far above the recent norms.

Used by TrainableStage on every backward and on every averaging round's result.
"""

from __future__ import annotations

import logging
import math
import statistics
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from swarm.errors import BadRequest

logger = logging.getLogger(__name__)


@dataclass
class GradientGuardConfig:
    """How far a microbatch's per-sample gradient norm may stray from the accepted ones."""

    # Honest per-sample norms drift a few x over a run, loss spikes and microbatch sizes; 50x
    # leaves them room while bounding what one poisoned microbatch does to Adam's moments.
    max_ratio: float = 50.0
    # 64 accepted norms: a median an attacker moves only by owning most of the recent traffic.
    window: int = 64
    warmup: int = 8  # accepted norms before the ratio applies (the absolute cap applies always)
    # Far above any honest per-sample norm, far below float32 overflow of its square (3.4e38).
    max_norm: float = 1e12


def gradient_norm(grads: Sequence[torch.Tensor | None]) -> float:
    """The L2 norm of all tensors together, in float64 (a float32 sum of squares overflows)."""
    total = 0.0
    for g in grads:
        if g is not None:
            total += float(torch.linalg.vector_norm(g.detach(), dtype=torch.float64)) ** 2
    return math.sqrt(total)


class GradientGuard:
    """Running statistics of accepted per-sample gradient norms, and the check against them."""

    def __init__(self, config: GradientGuardConfig | None = None) -> None:
        self.config = config or GradientGuardConfig()
        self._norms: deque[float] = deque(maxlen=self.config.window)
        self._lock = threading.Lock()
        self.rejected = 0

    def bound(self) -> float:
        """The largest per-sample norm accepted now."""
        with self._lock:
            if len(self._norms) < self.config.warmup:
                return self.config.max_norm
            scale = statistics.median(self._norms)
        return min(self.config.max_norm, self.config.max_ratio * max(scale, 1e-12))

    def problem(self, norm: float) -> str | None:
        """Why a per-sample gradient norm is refused, or None if it is within bounds."""
        if not math.isfinite(norm):
            return "is not finite"
        bound = self.bound()
        if norm > bound:
            return f"{norm:.3g} is above the bound {bound:.3g}"
        return None

    def check(self, what: str, grads: Sequence[torch.Tensor | None], samples: int) -> float:
        """Raise BadRequest (and log) if `grads` of `samples` samples are out of bounds.

        Returns their per-sample norm; nothing is recorded until `accept` is called.
        """
        for g in grads:
            if g is not None and not bool(torch.isfinite(g).all()):
                self._refuse(f"{what} holds NaN or infinite values")
        norm = gradient_norm(grads) / max(samples, 1)
        why = self.problem(norm)
        if why is not None:
            self._refuse(f"{what}: per-sample gradient norm {why}")
        return norm

    def accept(self, norm: float) -> None:
        with self._lock:
            self._norms.append(norm)

    def _refuse(self, message: str) -> None:
        self.rejected += 1
        logger.warning("refused: %s", message)
        raise BadRequest(f"{message}: not accumulated (a training peer refuses poisoned gradients)")
