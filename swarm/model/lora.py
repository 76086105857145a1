"""LoRA adapters and deep prompts applied to frozen blocks by hooks: spec, shapes, hash, apply.

Used by the peer's backend (fine-tuning backward, sessions with an adapter) and the client's tuning.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from swarm.errors import BadRequest
from swarm.model.config import ModelConfig
from swarm.model.llama import Block

# PEFT's target names (the linear's attribute) and where each sits inside a Block.
TARGETS = {
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj",
    "gate_proj": "mlp.gate_proj",
    "up_proj": "mlp.up_proj",
    "down_proj": "mlp.down_proj",
}
PROMPT = "prompt"  # a block's deep prompt: [pre_seq_len, hidden], added before the block runs

BlockTensors = dict[int, dict[str, torch.Tensor]]  # absolute block index -> name -> tensor


def target_name(name: str) -> str:
    """'q' or 'q_proj' -> 'q_proj'; BadRequest for anything else."""
    full = name if name.endswith("_proj") else f"{name}_proj"
    if full not in TARGETS:
        raise BadRequest(f"unknown LoRA target {name!r}; choose among {', '.join(TARGETS)}")
    return full


@dataclass(frozen=True)
class AdapterSpec:
    """What a per-block adapter holds: LoRA (rank, alpha, dropout, targets) and deep prompts."""

    rank: int = 0  # 0: no LoRA
    alpha: float = 1.0  # LoRA's output is scaled by alpha / rank, as PEFT does
    dropout: float = 0.0  # on the LoRA input, training calls only
    targets: tuple[str, ...] = ()
    pre_seq_len: int = 0  # deep prompts of this many positions (0: none)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.rank else 0.0

    @property
    def empty(self) -> bool:
        return not (self.rank and self.targets) and not self.pre_seq_len

    def check(self) -> None:
        """BadRequest naming the first inconsistent field."""
        if self.rank < 0 or self.pre_seq_len < 0:
            raise BadRequest("adapter rank and pre_seq_len must be >= 0")
        if bool(self.rank) != bool(self.targets):
            raise BadRequest("a LoRA adapter needs both a rank > 0 and target modules")
        for t in self.targets:
            if t not in TARGETS:
                raise BadRequest(f"unknown LoRA target {t!r}; choose among {', '.join(TARGETS)}")
        if len(set(self.targets)) != len(self.targets):
            raise BadRequest(f"LoRA targets repeat: {list(self.targets)}")
        if not (0.0 <= self.dropout < 1.0) or not (abs(self.alpha) < 1e6):
            raise BadRequest("LoRA dropout must be in [0, 1) and alpha finite")

    def to_json(self) -> str:
        return json.dumps(
            [
                self.rank,
                float(self.alpha),
                float(self.dropout),
                list(self.targets),
                self.pre_seq_len,
            ]
        )


def linear_shape(config: ModelConfig, target: str) -> tuple[int, int]:
    """(in_features, out_features) of a target linear of a block."""
    h, i, d = config.hidden_size, config.intermediate_size, config.head_dim
    return {
        "q_proj": (h, config.num_heads * d),
        "k_proj": (h, config.num_kv_heads * d),
        "v_proj": (h, config.num_kv_heads * d),
        "o_proj": (config.num_heads * d, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }[target]


def block_shapes(config: ModelConfig, spec: AdapterSpec) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor one block's adapter holds (PEFT's A [r, in], B [out, r])."""
    shapes: dict[str, tuple[int, ...]] = {}
    for t in spec.targets:
        fan_in, fan_out = linear_shape(config, t)
        shapes[f"{t}.lora_A"] = (spec.rank, fan_in)
        shapes[f"{t}.lora_B"] = (fan_out, spec.rank)
    if spec.pre_seq_len:
        shapes[PROMPT] = (spec.pre_seq_len, config.hidden_size)
    return shapes


def adapter_hash(spec: AdapterSpec, tensors: BlockTensors) -> str:
    """sha256 of the spec and every tensor (float32 bytes): the peers' cache key."""
    h = hashlib.sha256(spec.to_json().encode())
    for block in sorted(tensors):
        for name in sorted(tensors[block]):
            t = tensors[block][name].detach().to(torch.float32).contiguous().cpu()
            h.update(f"{block}.{name}{list(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass
class AdapterPayload:
    """An adapter for blocks [first, last) as a client sends it; hash computed once."""

    spec: AdapterSpec
    tensors: BlockTensors  # detached float32 copies
    hash: str = ""
    seed: int = 0  # per call: 0 runs without dropout (inference), else dropout masks' seed
    nbytes: int = field(default=0)

    def __post_init__(self) -> None:
        if not self.hash:
            self.hash = adapter_hash(self.spec, self.tensors)
        self.nbytes = sum(t.numel() * 4 for ts in self.tensors.values() for t in ts.values())


class _FrozenLinearGrad(torch.autograd.Function):
    """Passes a frozen linear's output on, and the gradient back to its input through W."""

    @staticmethod
    def forward(ctx, x, out, module):
        ctx.module = module
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        w = dense_weight(ctx.module).to(grad.dtype)
        return grad @ w, None, None


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The [out, in] float weight of any linear module: nn.Linear, Int8Linear, or others."""
    w = getattr(module, "weight", None)
    if isinstance(w, torch.Tensor):
        return w.detach()
    if hasattr(w, "dequantize"):
        return w.dequantize(torch.float32)
    # Any other linear: apply it to the identity (rows of the identity quantize exactly).
    with torch.no_grad():
        eye = torch.eye(module.in_features)
        out = module(eye)
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.Tensor):
            out = out - bias
        return out.t().contiguous()


def _lora_hook(a: torch.Tensor, b: torch.Tensor, scale: float, drop: float, gen):
    def hook(module, args, out):
        x = args[0]
        if drop > 0 and gen is not None:
            keep = torch.rand(x.shape, generator=gen, dtype=torch.float32) >= drop
            x = x * keep.to(x.dtype) / (1.0 - drop)
        return out + (x.to(a.dtype) @ a.t() @ b.t()).to(out.dtype) * scale

    return hook


def _grad_hook(module, args, out):
    x = args[0]
    if x.requires_grad and not out.requires_grad:
        return _FrozenLinearGrad.apply(x, out.detach(), module)
    return None


def _prompt_hook(prompt: torch.Tensor):
    def hook(module, args):
        x, start = args[0], int(args[3]) if len(args) > 3 else 0
        n = min(prompt.shape[0], start + x.shape[1]) - start
        if n <= 0:
            return None
        head = x[:, :n] + prompt[start : start + n].to(x.dtype)
        return (torch.cat([head, x[:, n:]], dim=1), *args[1:])

    return hook


@contextlib.contextmanager
def applied(
    blocks: list[tuple[int, Block]],
    spec: AdapterSpec | None,
    tensors: BlockTensors | None,
    seed: int = 0,
    grad_through: bool = False,
) -> Iterator[None]:
    """Run `blocks` (absolute index, module) with the adapter hooked in; unhooked on exit.

    seed: nonzero applies LoRA dropout with masks drawn from it (one generator per block, so a
        span split differently draws the same masks). grad_through: let gradients reach the
        input of linears that have no autograd (Int8Linear): QLoRA's frozen base.
    """
    handles = []
    try:
        for index, block in blocks:
            if grad_through:
                for m in block.modules():
                    if (
                        m is not block
                        and not isinstance(m, nn.Linear)
                        and hasattr(m, "in_features")
                    ):
                        handles.append(m.register_forward_hook(_grad_hook))
            if spec is None or tensors is None or spec.empty:
                continue
            ts = tensors.get(index, {})
            gen = None
            if seed and spec.dropout > 0:
                gen = torch.Generator().manual_seed((seed * 1_000_003 + index) % (1 << 62))
            for t in spec.targets:
                module = block.get_submodule(TARGETS[t])
                hook = _lora_hook(
                    ts[f"{t}.lora_A"], ts[f"{t}.lora_B"], spec.scale, spec.dropout, gen
                )
                handles.append(module.register_forward_hook(hook))
            if spec.pre_seq_len and PROMPT in ts:
                handles.append(block.register_forward_pre_hook(_prompt_hook(ts[PROMPT])))
        yield
    finally:
        for h in handles:
            h.remove()
