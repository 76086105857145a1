"""A client's trainable parameters over a frozen remote model: soft prompts, deep prompts, LoRA.

Used by DistributedModelForCausalLM (training, generation), petals_like.peft_format, swarm-finetune.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from swarm.errors import BadRequest
from swarm.model.config import ModelConfig
from swarm.model.lora import (
    PROMPT,
    AdapterPayload,
    AdapterSpec,
    BlockTensors,
    block_shapes,
    target_name,
)

METHODS = ("lora", "ptune", "deep_ptune")


@dataclass
class TuningConfig:
    """What is trained. Each field is the `swarm-finetune` flag `--field-name`."""

    method: str = field(
        default="lora",
        metadata={
            "help": "what to train: LoRA adapters or (deep) soft prompts",
            "choices": METHODS,
        },
    )
    rank: int = field(default=8, metadata={"help": "LoRA rank"})
    alpha: float = field(
        default=16.0, metadata={"help": "LoRA alpha (outputs scaled by alpha/rank)"}
    )
    dropout: float = field(default=0.0, metadata={"help": "LoRA dropout while training"})
    targets: list[str] = field(
        default_factory=lambda: ["q_proj", "v_proj"],
        metadata={"help": "LoRA target modules among q k v o gate up down (or q_proj, ...)"},
    )
    pre_seq_len: int = field(
        default=16, metadata={"help": "soft prompt length of ptune and deep_ptune"}
    )
    train_embeddings: bool = field(
        default=False, metadata={"help": "train the input embeddings too (kept locally)"}
    )
    train_head: bool = field(default=False, metadata={"help": "train the LM head too (locally)"})

    def check(self) -> None:
        if self.method not in METHODS:
            raise BadRequest(
                f"tuning method must be one of {', '.join(METHODS)}, got {self.method!r}"
            )
        if self.method == "lora" and (self.rank <= 0 or not self.targets):
            raise BadRequest("LoRA needs a rank > 0 and at least one target module")
        if self.method != "lora" and self.pre_seq_len <= 0:
            raise BadRequest(f"{self.method} needs pre_seq_len > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise BadRequest(f"LoRA dropout must be in [0, 1), got {self.dropout}")


def _key(name: str) -> str:
    return name.replace(".", "__")  # ParameterDict keys may not hold dots


class RemoteTuning(nn.Module):
    """Trainable parameters: `prompts` [pre_seq_len, H] (ptune, deep_ptune), per-block deep
    prompts and LoRA tensors in `blocks[i]` (sent to the peers serving block i).

    LoRA starts as PEFT does (A Kaiming-uniform, B zero) and deep prompts at zero, so an
    untrained adapter leaves the model as it was.
    """

    def __init__(self, config: ModelConfig, tuning: TuningConfig, init_embeddings=None):
        super().__init__()
        tuning.check()
        self.model_config, self.tuning = config, tuning
        targets = tuple(target_name(t) for t in tuning.targets) if tuning.method == "lora" else ()
        deep = tuning.pre_seq_len if tuning.method == "deep_ptune" else 0
        self.spec = AdapterSpec(
            rank=tuning.rank if targets else 0,
            alpha=tuning.alpha,
            dropout=tuning.dropout,
            targets=targets,
            pre_seq_len=deep,
        )
        self.pre_seq_len = tuning.pre_seq_len if tuning.method != "lora" else 0
        self.prompts: nn.Parameter | None = None
        if self.pre_seq_len:
            h = config.hidden_size
            if init_embeddings is not None:  # start from random tokens' embeddings
                ids = torch.randint(0, init_embeddings.shape[0], (self.pre_seq_len,))
                init = init_embeddings[ids].detach().clone().float()
            else:
                init = torch.randn(self.pre_seq_len, h) * 0.02
            self.prompts = nn.Parameter(init)
        shapes = block_shapes(config, self.spec) if not self.spec.empty else {}
        blocks = []
        for _ in range(config.num_layers):
            d = nn.ParameterDict()
            for name, shape in shapes.items():
                t = torch.zeros(shape)
                if name.endswith("lora_A"):
                    nn.init.kaiming_uniform_(t, a=math.sqrt(5))
                d[_key(name)] = nn.Parameter(t)
            blocks.append(d)
        self.blocks = nn.ModuleList(blocks)

    @property
    def remote(self) -> bool:
        """Whether peers get an adapter (LoRA or deep prompts); ptune stays client-side."""
        return not self.spec.empty

    def named_block_params(self, first: int, last: int) -> list[tuple[int, str, nn.Parameter]]:
        """(block, name, parameter) of blocks [first, last), in the wire's order."""
        out = []
        for b in range(first, last):
            for k in sorted(self.blocks[b].keys()):
                out.append((b, k.replace("__", "."), self.blocks[b][k]))
        return out

    def block_tensors(self, first: int, last: int) -> BlockTensors:
        """Detached float32 copies of blocks [first, last)'s adapter."""
        out: BlockTensors = {}
        for b, name, p in self.named_block_params(first, last):
            out.setdefault(b, {})[name] = p.detach().float().clone()
        return out

    def payload(self, first: int, last: int, seed: int = 0) -> AdapterPayload | None:
        """What peers serving [first, last) get (None: nothing, as for ptune)."""
        if not self.remote:
            return None
        return AdapterPayload(self.spec, self.block_tensors(first, last), seed=seed)

    def load_block_tensors(self, tensors: BlockTensors) -> None:
        """Copy tensors (block -> name -> tensor) into the parameters; BadRequest on a mismatch."""
        for b, ts in tensors.items():
            if not 0 <= b < len(self.blocks):
                raise BadRequest(f"adapter block {b} is outside the model's {len(self.blocks)}")
            for name, t in ts.items():
                key = _key(name)
                if key not in self.blocks[b]:
                    raise BadRequest(f"adapter tensor {b}.{name} is not part of this adapter")
                p = self.blocks[b][key]
                if tuple(t.shape) != tuple(p.shape):
                    raise BadRequest(
                        f"adapter tensor {b}.{name} has shape {list(t.shape)}, expected "
                        f"{list(p.shape)}"
                    )
                with torch.no_grad():
                    p.copy_(t)

    def deep_prompts(self) -> torch.Tensor | None:
        """[num_layers, pre_seq_len, H] of deep_ptune (None otherwise)."""
        if not self.spec.pre_seq_len:
            return None
        return torch.stack([self.blocks[b][_key(PROMPT)] for b in range(len(self.blocks))])

    def prepend(self, embeds: torch.Tensor) -> torch.Tensor:
        """[B, T, H] -> [B, pre_seq_len + T, H] with the soft prompts in front (if any)."""
        if self.prompts is None:
            return embeds
        p = self.prompts.to(embeds.dtype)[None].expand(embeds.shape[0], -1, -1)
        return torch.cat([p, embeds], dim=1)
