"""Training data: text files tokenized into one stream, cut into fixed-length random windows.

Used by the SWARM trainer and by the single-process reference run it is compared with.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from swarm.errors import BadRequest

logger = logging.getLogger(__name__)


class TokenWindows:
    """All files' tokens end to end (EOS between files); batches of random windows of seq_len.

    The same (files, seq_len, seed) always yields the same batches, so a distributed run and a
    single-process run see identical data.
    """

    def __init__(
        self,
        tokens: Sequence[int],
        seq_len: int,
        vocab_size: int | None = None,
    ) -> None:
        if seq_len < 2:
            raise BadRequest("--seq-len must be at least 2")
        if len(tokens) <= seq_len:
            raise BadRequest(
                f"the data has {len(tokens)} tokens; need more than --seq-len {seq_len}"
            )
        ids = torch.tensor(list(tokens), dtype=torch.long)
        if vocab_size is not None and (ids.min() < 0 or ids.max() >= vocab_size):
            raise BadRequest(f"token ids fall outside the model's vocabulary of {vocab_size}")
        self.ids = ids
        self.seq_len = seq_len

    @classmethod
    def from_files(
        cls, tokenizer, files: Sequence[str | Path], seq_len: int, vocab_size: int | None = None
    ) -> TokenWindows:
        tokens: list[int] = []
        eos_ids = getattr(tokenizer, "eos_token_ids", None) or []
        for f in files:
            path = Path(f)
            if not path.is_file():
                raise BadRequest(f"data file {path} does not exist")
            tokens += tokenizer.encode(path.read_text(encoding="utf-8", errors="replace"))
            tokens += list(eos_ids[:1])
        logger.info("data: %d tokens from %d files", len(tokens), len(files))
        return cls(tokens, seq_len, vocab_size)

    def __len__(self) -> int:
        return len(self.ids)

    def batches(self, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
        """Endless [batch_size, seq_len] batches of windows at seeded random offsets."""
        if batch_size <= 0:
            raise BadRequest("--batch-size must be positive")
        gen = torch.Generator().manual_seed(seed)
        span = len(self.ids) - self.seq_len + 1
        while True:
            starts = torch.randint(0, span, (batch_size,), generator=gen)
            yield torch.stack([self.ids[s : s + self.seq_len] for s in starts.tolist()])


class ByteTokenizer:
    """UTF-8 bytes as token ids, for checkpoints that ship no tokenizer (tests, tiny models)."""

    eos_token_ids: list[int] = []

    def __init__(self, vocab_size: int) -> None:
        if vocab_size < 2:
            raise BadRequest("a byte tokenizer needs a vocabulary of at least 2")
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        return [b % self.vocab_size for b in text.encode("utf-8")]


def split_microbatches(batch: torch.Tensor, k: int) -> list[torch.Tensor]:
    """Split [B, L] into k nearly equal microbatches (k is capped at B)."""
    if k <= 0:
        raise BadRequest("--microbatches must be positive")
    return [mb for mb in torch.tensor_split(batch, min(k, batch.shape[0])) if mb.shape[0]]
