"""Single-process training of the same model on the same data: what SWARM training must follow.

Used by the training tests and `simulations/bench_training.py` to compare loss curves.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch.nn.functional as F

from swarm.errors import SwarmError
from swarm.model.loading import load_config, load_model, load_tokenizer, resolve_model
from swarm.training.data import ByteTokenizer, TokenWindows
from swarm.training.optim8bit import AdamConfig, AdamW

logger = logging.getLogger(__name__)


def train_local(
    model: str,
    data: Sequence[str],
    steps: int,
    batch_size: int,
    seq_len: int,
    lr: float,
    seed: int = 0,
    weight_decay: float = 0.0,
    warmup_steps: int = 0,
) -> list[float]:
    """Per-step mean losses of plain AdamW training on whole batches in this process."""
    source = resolve_model(model)
    config = load_config(source)
    try:
        tokenizer = load_tokenizer(source)
    except (SwarmError, OSError, ValueError):
        tokenizer = ByteTokenizer(config.vocab_size)
    windows = TokenWindows.from_files(tokenizer, data, seq_len, config.vocab_size)
    net = load_model(source, progress=False).float().train()
    params = list(net.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = AdamW(params, AdamConfig(lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps))
    losses = []
    batches = windows.batches(batch_size, seed)
    for _ in range(steps):
        ids = next(batches)
        logits = net(ids)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        for p in params:
            p.grad = None
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def max_abs_gap(a: Sequence[float], b: Sequence[float]) -> float:
    """Largest per-step difference of two loss curves over their common steps."""
    n = min(len(a), len(b))
    return max((abs(x - y) for x, y in zip(a[:n], b[:n], strict=True)), default=0.0)
