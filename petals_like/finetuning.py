"""The fine-tuning face of DistributedModelForCausalLM: trainable parameters, forward, saving.

Mixed into DistributedModelForCausalLM (petals_like.model); the autograd op: remote_blocks.
"""

from __future__ import annotations

from typing import Any

import torch

from petals_like.tuning import RemoteTuning
from swarm.errors import BadRequest


class FineTuningMixin:
    """Needs config, client_parts, router, loop, model_prefix, tuning, _blocks and _payloads."""

    def set_tuning(self, tuning: RemoteTuning | None) -> None:
        """Train or serve with `tuning`: base weights, local and remote, stay frozen."""
        from petals_like.remote_blocks import RemoteBlocks

        self.tuning = tuning
        self._payloads.clear()
        self._blocks = RemoteBlocks(self.router, tuning)
        tc = tuning.tuning if tuning is not None else None
        parts = self.client_parts
        for p in parts.parameters():
            p.requires_grad_(False)
        if tc is not None and tc.train_embeddings:
            parts.embed_tokens.weight.requires_grad_(True)
        if tc is not None and tc.train_head:
            parts.lm_head.weight.requires_grad_(True)

    def parameters(self) -> list[torch.nn.Parameter]:
        """What fine-tuning trains: the adapter, and embeddings / head where asked."""
        params = list(self.tuning.parameters()) if self.tuning is not None else []
        seen = {id(p) for p in params}
        for p in self.client_parts.parameters():
            if p.requires_grad and id(p) not in seen:
                params.append(p)
                seen.add(id(p))
        return params

    @property
    def retries(self) -> int:
        """Spans retried on another replica by training forwards and backwards."""
        return self._blocks.retries if self._blocks is not None else 0

    @property
    def wire_bytes(self) -> int:
        """Bytes of activations, gradients and adapters that training moved (approximate)."""
        return self._blocks.wire_bytes if self._blocks is not None else 0

    def adapter_payload(self, start: int, end: int) -> Any:
        """The adapter of blocks [start, end) as peers get it (computed once per version)."""
        if self.tuning is None:
            return None
        # Optimizer steps update parameters in place, which bumps each tensor's version counter.
        version = tuple(p._version for p in self.tuning.parameters())
        key = (start, end, version)
        if key not in self._payloads:
            if len(self._payloads) > 64:
                self._payloads.clear()
            self._payloads[key] = self.tuning.payload(start, end)
        return self._payloads[key]

    def __call__(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None):
        return self.forward(input_ids, labels)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None):
        """Logits [B, T, vocab] of `input_ids` [B, T] with autograd through the swarm.

        With `labels` [B, T] (-100: ignored), returns (loss, logits): next-token cross-entropy.
        """
        from petals_like.remote_blocks import RemoteBlocks, RemoteBlocksFunction

        ids = torch.as_tensor(input_ids, dtype=torch.long)
        if ids.dim() != 2 or ids.numel() == 0:
            raise BadRequest(f"input_ids must be [batch, length], got shape {tuple(ids.shape)}")
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise BadRequest(f"token ids must be in 0..{self.config.vocab_size - 1}")
        if self._blocks is None:
            self._blocks = RemoteBlocks(self.router, None)
        tuning = self.tuning
        hidden = self.client_parts.embed(ids)
        pre = 0
        if tuning is not None:
            hidden = tuning.prepend(hidden)
            pre = tuning.pre_seq_len
        meta, params = [], []
        if tuning is not None and tuning.remote:
            for b, name, p in tuning.named_block_params(0, self.config.num_layers):
                meta.append((b, name))
                params.append(p)
        out = RemoteBlocksFunction.apply(hidden, self._blocks, self.loop.run, meta, *params)
        logits = self.client_parts.logits(out[:, pre:])
        if labels is None:
            return logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]),
            torch.as_tensor(labels)[:, 1:].reshape(-1),
            ignore_index=-100,
        )
        return loss, logits

    def save_adapter(self, folder: str) -> None:
        """Write the adapter as a PEFT folder (LoRA) or a safetensors file of soft prompts."""
        from petals_like.peft_format import save_adapter

        if self.tuning is None:
            raise BadRequest("nothing to save: the model has no tuning")
        save_adapter(self.tuning, folder, self.model_prefix, self.client_parts)
