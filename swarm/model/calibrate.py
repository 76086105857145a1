"""Calibrated 4-bit quantization of a whole model (GPTQ, kernels.gptq) on text the fp32 model
samples itself: data-free, so no evaluation text can leak in. Used by loading and bench_local.

Loading (swarm.model.loading) calibrates a peer's span alone with sequential=False: a block is
calibrated on the inputs the *fp32* model gives it, so its codes depend only on the checkpoint,
the config and the seed, and a peer's equal a local model's. sequential=True (the quantized
blocks' outputs, GPTQ's way) needs every earlier block quantized (bench_local --calib-sequential).
SmolLM2-135M, Pride and Prejudice ch. 1 (fp32 21.350), seeds 0/1, k/v int8: sequential
+6.00%/+6.78%, non-sequential +6.52%/+7.09%; block 3's down_proj int8 too (the default):
sequential +5.14%/+4.83% at 0.5587 bytes/param, non-sequential (what loading gives) seeds
0/1/2 +6.63%/+6.76%/+4.75%; with the block scales re-fit to the codes (refine, the default)
+6.01%/+5.84%/+4.54%, same bytes; and true_sequential (the default) +5.47%/+5.09%/+5.50%
(mean -0.1, worst -0.5; GPTQ 1.5x slower). Not paying: true_sequential alone +5.92/+7.68/+5.97%;
AWQ input-channel scales (alpha grid, round-to-nearest error) on top +6.58% (seed 0, 2.5x slower);
64x64 or 16x256 tokens, temperature 0.9 and top-p 0.95, or keep=0 with three int8 down_proj
instead were all worse (+7.8..+8.8%, seed 0, sequential).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import nn

from kernels import add_to_hessian, gptq_quantize_4bit
from swarm.errors import BadRequest
from swarm.model.fourbit import FourBitLinear
from swarm.model.int8 import Int8Linear
from swarm.model.llama import Block, LlamaModel, rope_cos_sin
from swarm.quant import FOURBIT_MODES

logger = logging.getLogger(__name__)

# Linear layers of a block that read the same input, and so share one Hessian.
_SHARED_INPUT = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


@dataclass
class CalibrationConfig:
    """How calibrated 4-bit weights are made.

    sequences, length: calibration text, sampled by the fp32 model (sequences x length tokens).
    seed: of the sampler (the same seed gives the same weights). damp: GPTQ's dampening, a
    fraction of the Hessian's mean diagonal (0.1: 0.01 overfits the few thousand tokens).
    clip: search each block's scale (clipped absmax; measured no gain). sequential: calibrate
    each block on the quantized earlier blocks' outputs (GPTQ's way), not on the fp32 ones.
    int8: names of linear layers (as in a Block, e.g. "self_attn.v_proj") kept in int8: k and v
    measured the most sensitive to 4 bits; 6% of SmolLM2's block weights (+0.03 bytes/param).
    act_order: GPTQ quantizes the inputs of largest Hessian diagonal first. skip_first: positions
    at the start of each sequence left out of the Hessians (the first token's huge activations).
    keep: fraction of each layer's input columns kept in float16 (kernels.gptq; 2 bytes each).
    Names in int8 may also be "BLOCK:name" (e.g. "0:mlp.down_proj", "-1:mlp.down_proj" for the
    last block): that one layer of that one block only.
    temperature, top_p: of the sampler (1.0, 1.0: plain sampling from the model).
    refine: after GPTQ, re-fit each layer's block scales to its codes (kernels.gptq,
    refine_block_scales): least output error for the codes chosen, in the same bytes.
    true_sequential: within a block, each layer group's Hessian comes from inputs through the
    groups quantized before it (q/k/v, then o, then gate/up, then down), not the fp32 block's;
    the block's own inputs stay as `sequential` says, so codes stay span-independent.
    """

    sequences: int = 32
    length: int = 128
    seed: int = 0
    damp: float = 0.1
    clip: bool = False
    sequential: bool = True
    # Block 3's down_proj: the most sensitive 4-bit layer of SmolLM2-135M by the KL on held-out
    # sampled text (per-layer ablation); +0.004 bytes/param, -0.9/-1.9 perplexity points.
    int8: tuple[str, ...] = ("self_attn.k_proj", "self_attn.v_proj", "3:mlp.down_proj")
    act_order: bool = True
    skip_first: int = 0
    keep: float = 0.005
    temperature: float = 1.0
    top_p: float = 1.0
    # Re-fit scales: -0.6/-0.9/-0.2 perplexity points (seeds 0/1/2, load path), same bytes.
    refine: bool = True
    # With refine: -0.5/-0.8/+1.0 points (seeds 0/1/2; a lower worst case), 1.5x GPTQ time.
    true_sequential: bool = True

    def int8_names(self, index: int, num_layers: int) -> set[str]:
        """Names of the linear layers of block `index` (of `num_layers`) kept in int8."""
        names = set()
        for spec in self.int8:
            block, sep, name = spec.rpartition(":")
            if not sep:
                names.add(name)
            elif int(block) % num_layers == index:
                names.add(name)
        return names


# What loading uses (swarm.model.loading): each block calibrated alone, on fp32 activations.
LOAD_CALIBRATION = CalibrationConfig(sequential=False)


@torch.inference_mode()
def sample_calibration_ids(
    model: LlamaModel,
    sequences: int,
    length: int,
    seed: int = 0,
    temperature: float = 1.0,
    top_p: float = 1.0,
) -> torch.Tensor:
    """[sequences, length] token ids sampled from `model` (at `temperature`, nucleus `top_p`),
    each sequence started by a uniformly drawn token (a diverse, data-free calibration set).
    """
    if sequences < 1 or length < 2:
        raise BadRequest(
            f"calibration needs >= 1 sequence of >= 2 tokens, got {sequences}x{length}"
        )
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (sequences, 1), generator=g)
    caches = model.new_caches(sequences, length)
    out = [ids]
    for pos in range(length - 1):
        probs = (model(out[-1], pos, caches)[:, -1].float() / temperature).softmax(-1)
        if top_p < 1.0:
            # Nucleus: keep the most likely tokens whose mass reaches top_p (at least one).
            sorted_p, order = probs.sort(dim=-1, descending=True)
            drop = sorted_p.cumsum(-1) - sorted_p > top_p
            probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
        out.append(torch.multinomial(probs, 1, generator=g))
    return torch.cat(out, dim=1)


def _linear(block: Block, name: str) -> nn.Linear:
    return block.get_submodule(name)


def _hessian(x: torch.Tensor, skip: int) -> torch.Tensor:
    """X^T X of inputs x [B, T, n], the first `skip` positions of every sequence left out."""
    h = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float32)
    return add_to_hessian(h, x[:, skip:].float())


@torch.inference_mode()
def _group_hessian(block: Block, group: str, hidden, cos, sin, skip: int = 0) -> torch.Tensor:
    """Hessian of the input of linear layer `group` (the first of a _SHARED_INPUT group) when
    `block`, as quantized so far, runs on hidden [B, T, H]; only the layers before it are run.
    """
    attn, mlp = block.self_attn, block.mlp
    x = block.input_layernorm(hidden)
    if group == "self_attn.q_proj":
        return _hessian(x, skip)
    if group == "self_attn.o_proj":
        seen: list[torch.Tensor] = []
        handle = attn.o_proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
        try:
            attn(x, cos, sin, 0, None)
        finally:
            handle.remove()
        return _hessian(seen[0], skip)
    x = block.post_attention_layernorm(hidden + attn(x, cos, sin, 0, None))
    if group == "mlp.gate_proj":
        return _hessian(x, skip)
    if group == "mlp.down_proj":
        return _hessian(torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x), skip)
    raise ValueError(f"no Hessian for {group!r}")


def calibrate_block(
    block: Block,
    index: int,
    num_layers: int,
    hidden: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    quant: str,
    config: CalibrationConfig,
) -> torch.Tensor:
    """Replace, in place, the nn.Linear layers of the float `block` (number `index` of
    `num_layers`) by GPTQ-calibrated ones, on its inputs `hidden` [B, T, H]. Returns the inputs
    of the next block: the quantized block's output if config.sequential, else the float one's.
    """
    int8 = config.int8_names(index, num_layers)
    with torch.inference_mode():
        out = block(hidden, cos, sin)
    skip = config.skip_first
    hessians = (
        {}
        if config.true_sequential
        else {g[0]: _group_hessian(block, g[0], hidden, cos, sin, skip) for g in _SHARED_INPUT}
    )
    for group in _SHARED_INPUT:
        # true_sequential: each group's inputs come through the block's layers quantized so far.
        h = hessians.get(group[0])
        if h is None:
            h = _group_hessian(block, group[0], hidden, cos, sin, skip)
        fourbit = [name for name in group if name not in int8]
        qs = gptq_quantize_4bit(
            [_linear(block, name).weight.detach().float() for name in fourbit],
            h,
            quant,
            config.damp,
            config.clip,
            config.act_order,
            config.keep,
            config.refine,
        )
        for name in group:
            lin = _linear(block, name)
            if name in int8:
                new: nn.Module = Int8Linear.from_linear(lin)
            else:
                bias = None if lin.bias is None else lin.bias.detach().clone()
                new = FourBitLinear.from_weight(qs[fourbit.index(name)], bias)
            parent, _, attr = name.rpartition(".")
            setattr(block.get_submodule(parent), attr, new)
    if config.sequential:
        with torch.inference_mode():
            out = block(hidden, cos, sin)
    return out


def quantize_calibrated(
    model: LlamaModel,
    quant: str = "nf4",
    config: CalibrationConfig | None = None,
    ids: torch.Tensor | None = None,
) -> LlamaModel:
    """Replace, in place, every nn.Linear of the model's blocks by a GPTQ-calibrated
    FourBitLinear of `quant` ("nf4", "fp4" or "int4"); the client parts stay in float.

    ids: calibration token ids [sequences, length]; None samples them from the model as
    `config` says (sample_calibration_ids).
    """
    if quant not in FOURBIT_MODES:
        raise BadRequest(f"calibrated quantization is for {', '.join(FOURBIT_MODES)}; got {quant}")
    config = config or CalibrationConfig()
    t0 = time.perf_counter()
    if ids is None:
        ids = sample_calibration_ids(
            model, config.sequences, config.length, config.seed, config.temperature, config.top_p
        )
    t_sample = time.perf_counter() - t0
    span = model.span
    with torch.inference_mode():
        hidden = model.client.embed(ids).float()
        positions = torch.arange(ids.shape[1])
        cos, sin = rope_cos_sin(span.inv_freq, positions, hidden.dtype)
    for index, block in enumerate(span.blocks, start=span.start):
        hidden = calibrate_block(
            block, index, model.config.num_layers, hidden, cos, sin, quant, config
        )
    logger.info(
        "calibrated %s on %dx%d sampled tokens: sampling %.1fs, GPTQ %.1fs",
        quant,
        ids.shape[0],
        ids.shape[1],
        t_sample,
        time.perf_counter() - t0 - t_sample,
    )
    return model
