"""The fine-tuning loop over a frozen swarm: text to token windows, optimizer steps, held-out loss.

Used by `swarm-finetune` (petals_like.finetune_cli) and simulations/bench_finetune.py.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from swarm.errors import BadRequest, NoRoute, PeerUnavailable, SwarmError

logger = logging.getLogger(__name__)


@dataclass
class FinetuneConfig:
    """A fine-tuning run. Each field is the `swarm-finetune` flag `--field-name`."""

    model: str = field(
        default="smollm2-135m", metadata={"help": "model alias, HF folder or .gguf file"}
    )
    initial_peers: list[str] = field(
        default_factory=list, metadata={"help": "multiaddrs of peers of the swarm"}
    )
    data: list[str] = field(default_factory=list, metadata={"help": "text files to train on"})
    steps: int = field(default=60, metadata={"help": "optimizer steps"})
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate"})
    batch_size: int = field(default=4, metadata={"help": "sequences per step"})
    seq_len: int = field(default=64, metadata={"help": "tokens per sequence"})
    heldout: float = field(
        default=0.1, metadata={"help": "share of the text kept out of training to measure loss"}
    )
    save: str | None = field(
        default=None, metadata={"help": "folder to write the adapter to (PEFT format for LoRA)"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the initial adapter and batches"})
    compression: str = field(
        default="auto", metadata={"help": "activation codec: auto, none or a codec name"}
    )


@dataclass
class StepStats:
    step: int
    loss: float
    samples_per_s: float
    retries: int
    wire_bytes: int


@dataclass
class FinetuneResult:
    history: list[StepStats]
    heldout_before: float
    heldout_after: float
    retries: int
    lost: int
    samples: int
    seconds: float


def tokenize_files(paths: list[str], tokenizer: Any, vocab_size: int) -> list[int]:
    """Token ids of the files' text; UTF-8 bytes (mod vocab_size) where there is no tokenizer."""
    ids: list[int] = []
    for p in paths:
        text = Path(p).read_text(errors="replace")
        if tokenizer is not None:
            ids.extend(tokenizer.encode(text))
        else:
            ids.extend(b % vocab_size for b in text.encode())
    return ids


class TokenWindows:
    """Random [batch, seq_len] windows of a token stream, a held-out tail kept apart."""

    def __init__(self, ids: list[int], seq_len: int, heldout: float, seed: int):
        n_held = max(seq_len + 1, int(len(ids) * heldout)) if heldout > 0 else 0
        if len(ids) - n_held < seq_len + 1:
            raise BadRequest(
                f"the data holds {len(ids)} tokens: too few for windows of {seq_len} "
                f"(and a held-out part of {n_held})"
            )
        self.seq_len = seq_len
        self.train = torch.tensor(ids[: len(ids) - n_held])
        self.held = torch.tensor(ids[len(ids) - n_held :])
        self.rng = random.Random(seed)

    def batch(self, size: int) -> torch.Tensor:
        starts = [self.rng.randrange(0, len(self.train) - self.seq_len) for _ in range(size)]
        return torch.stack([self.train[s : s + self.seq_len] for s in starts])

    def heldout_batches(self, size: int, most: int = 4) -> list[torch.Tensor]:
        n = len(self.held) // self.seq_len
        rows = [self.held[i * self.seq_len : (i + 1) * self.seq_len] for i in range(n)]
        return [torch.stack(rows[i : i + size]) for i in range(0, len(rows), size)][:most]


def heldout_loss(model: Any, windows: TokenWindows, batch_size: int) -> float:
    batches = windows.heldout_batches(batch_size)
    if not batches:
        return float("nan")
    with torch.no_grad():
        losses = [model(b, labels=b)[0].item() for b in batches]
    return sum(losses) / len(losses)


def finetune(
    model: Any,
    config: FinetuneConfig,
    windows: TokenWindows,
    on_step: Callable[[StepStats], None] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> FinetuneResult:
    """`config.steps` optimizer steps of `model.parameters()` (a DistributedModelForCausalLM).

    A step that no replica could take (after the model's bounded retries) is counted lost and
    skipped; a refused request (BadRequest: a rank over the peers' cap, ...) stops the run.
    """
    params = model.parameters()
    if not params:
        raise BadRequest("the model has nothing to train: give it a tuning")
    opt = optimizer or torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    t_start = time.monotonic()
    before = heldout_loss(model, windows, config.batch_size)
    history: list[StepStats] = []
    lost = 0
    for step in range(1, config.steps + 1):
        batch = windows.batch(config.batch_size)
        retries0, bytes0 = model.retries, model.wire_bytes
        t0 = time.monotonic()
        try:
            opt.zero_grad(set_to_none=True)
            loss, _ = model(batch, labels=batch)
            loss.backward()
            opt.step()
        except (PeerUnavailable, NoRoute) as e:  # a bad request (rank over a cap) is no loss
            lost += 1
            logger.warning("step %d lost: %s", step, e)
            continue
        dt = time.monotonic() - t0
        value = loss.item()
        if not math.isfinite(value):
            raise SwarmError(f"step {step}: the loss is {value}; lower --lr")
        s = StepStats(
            step,
            value,
            config.batch_size / max(dt, 1e-9),
            model.retries - retries0,
            model.wire_bytes - bytes0,
        )
        history.append(s)
        if on_step is not None:
            on_step(s)
    after = heldout_loss(model, windows, config.batch_size)
    return FinetuneResult(
        history,
        before,
        after,
        model.retries,
        lost,
        len(history) * config.batch_size,
        time.monotonic() - t_start,
    )
