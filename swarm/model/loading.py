"""Load config, tokenizer, client parts or a span of blocks from a HF folder or a GGUF file.

Used by the peer (`load_span`), the client (`load_client_parts`, `load_tokenizer`) and local runs.
Only the tensors asked for are read: loading blocks 10..19 never touches the other blocks,
except for calibrated 4-bit ("nf4", "fp4", "int4"): their GPTQ codes need the fp32 activations
of every earlier block (streamed one block at a time) and text the model samples once; both are
cached on disk (swarm.model.calibration_cache). "nf4-rtn" etc. load round-to-nearest codes.
"""

from __future__ import annotations

import ctypes
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from swarm.errors import BadRequest, CheckpointError
from swarm.model import calibration_cache
from swarm.model.calibrate import (
    LOAD_CALIBRATION,
    CalibrationConfig,
    calibrate_block,
    sample_calibration_ids,
)
from swarm.model.config import ModelConfig
from swarm.model.llama import Block, BlockSpan, ClientParts, LlamaModel, rope_cos_sin, rope_inv_freq
from swarm.model.loaders.gguf import BLOCK_TENSORS, CLIENT_TENSORS, GGUFFile, unpermute_qk
from swarm.model.loaders.hf import HFCheckpoint, read_json
from swarm.model.loaders.resolve import DEFAULT_MODEL, ModelSource, resolve_model
from swarm.model.quantize import quantize_blocks_as
from swarm.model.tokenizer import Tokenizer
from swarm.quant import FOURBIT_MODES, QUANT_MODES

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MODEL",
    "QUANT_MODES",
    "ModelSource",
    "load_client_parts",
    "load_config",
    "load_model",
    "load_span",
    "load_tokenizer",
    "resolve_model",
]


class _Reader:
    """One open checkpoint of either kind, giving tensors by our module's parameter names."""

    def __init__(self, source: ModelSource):
        self.source = source
        if source.kind == "gguf":
            self.gguf: GGUFFile | None = GGUFFile(source.path)
            self.hf: HFCheckpoint | None = None
            tied = "output.weight" not in self.gguf.tensors
            self.config = ModelConfig.from_gguf(self.gguf.metadata, source.name, tied=tied)
        else:
            self.gguf = None
            self.config = ModelConfig.from_hf(read_json(source.path / "config.json"), source.name)
            self.hf = HFCheckpoint(source.path)

    def block_tensor(self, index: int, suffix: str, dtype: torch.dtype) -> torch.Tensor:
        if self.hf is not None:
            return self.hf.tensor(f"model.layers.{index}.{suffix}", dtype)
        assert self.gguf is not None  # internal invariant, not input validation
        w = self.gguf.tensor(f"blk.{index}.{BLOCK_TENSORS[suffix]}", torch.float32)
        # llama.cpp's converter permutes q/k rows of "llama" models for its RoPE layout.
        if self.gguf.architecture == "llama" and suffix.startswith("self_attn.q_proj"):
            w = unpermute_qk(w, self.config.num_heads)
        elif self.gguf.architecture == "llama" and suffix.startswith("self_attn.k_proj"):
            w = unpermute_qk(w, self.config.num_kv_heads)
        return w.to(dtype)

    def client_tensor(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        if self.hf is not None:
            hf_name = "lm_head.weight" if name == "lm_head.weight" else f"model.{name}"
            return self.hf.tensor(hf_name, dtype)
        assert self.gguf is not None
        return self.gguf.tensor(CLIENT_TENSORS[name], dtype)

    def close(self) -> None:
        if self.gguf is not None:
            self.gguf.close()
        if self.hf is not None:
            self.hf.close()


@contextmanager
def _open(source_or_str: str | ModelSource) -> Iterator[_Reader]:
    reader = _Reader(resolve_model(source_or_str))
    try:
        yield reader
    finally:
        reader.close()


def _fill(module: nn.Module, tensors: dict[str, torch.Tensor], what: str) -> None:
    """Copy tensors into `module`, checking that names and shapes match exactly."""
    expected = module.state_dict()
    for name, value in tensors.items():
        if name not in expected:
            continue
        if tuple(value.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{what}: tensor {name} has shape {tuple(value.shape)}, "
                f"the config implies {tuple(expected[name].shape)}"
            )
    missing = [n for n in expected if n not in tensors]
    if missing:
        raise CheckpointError(f"{what}: checkpoint lacks {', '.join(missing)}")
    module.load_state_dict(tensors, strict=True)


def load_config(source_or_str: str | ModelSource) -> ModelConfig:
    """The model's config (reads only config.json or the GGUF header)."""
    with _open(source_or_str) as r:
        return r.config


def load_tokenizer(source_or_str: str | ModelSource) -> Tokenizer:
    """The model's tokenizer (tokenizer.json of a folder, or the GGUF file's vocabulary)."""
    source = resolve_model(source_or_str)
    if source.kind == "hf":
        return Tokenizer.from_hf_folder(source.path)
    with GGUFFile(source.path) as f:
        return Tokenizer.from_gguf_metadata(f.metadata)


def _check_range(config: ModelConfig, start: int, end: int) -> None:
    if not 0 <= start < end <= config.num_layers:
        raise BadRequest(
            f"block range {start}:{end} is outside the model's {config.num_layers} blocks "
            f"(valid: 0 <= start < end <= {config.num_layers})"
        )


def _progress(total: int, enabled: bool, desc: str):
    # Shown on a terminal's stderr only, and only when a load takes longer than a second.
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(
        total=total,
        desc=desc,
        disable=not enabled or not sys.stderr.isatty(),
        delay=1.0,
        file=sys.stderr,
        leave=False,
    )


def _release_freed_memory() -> None:
    """Hand memory freed by the load back to the OS (glibc keeps it otherwise).

    Quantizing makes float copies of every block on the way: measured on SmolLM2 nf4, the
    process kept ~300 MB more than the model holds until malloc_trim. A no-op off glibc.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _float_block(r: _Reader, index: int, dtype: torch.dtype) -> Block:
    with torch.device("meta"):
        block = Block(r.config)
    block = block.to_empty(device="cpu").to(dtype)
    tensors = {n: r.block_tensor(index, n, dtype) for n, _ in block.named_parameters()}
    _fill(block, tensors, f"block {index}")
    return block


def _calibration_ids(r: _Reader, identity: str, config: CalibrationConfig) -> torch.Tensor:
    """The calibration text for `config`: cached, else sampled by the whole fp32 model once."""
    path = calibration_cache.ids_path(identity, config)
    ids = calibration_cache.load_ids(path)
    if ids is not None and tuple(ids.shape) == (config.sequences, config.length):
        return ids
    t0 = time.perf_counter()
    client = _load_client(r, torch.float32)
    span = _load_span(r, 0, r.config.num_layers, "none", torch.float32, False, None)
    model = LlamaModel(r.config, client, span).eval()
    ids = sample_calibration_ids(
        model, config.sequences, config.length, config.seed, config.temperature, config.top_p
    )
    calibration_cache.save_ids(path, ids)
    logger.info("sampled %dx%d calibration tokens in %.1fs", *ids.shape, time.perf_counter() - t0)
    return ids


def _calibrated_blocks(
    r: _Reader, start: int, end: int, quant: str, config: CalibrationConfig, bar
) -> dict[int, Block]:
    """Blocks start..end-1 with GPTQ-calibrated float32 codes, from the cache where it has them.

    Each block is calibrated on the fp32 model's activations (non-sequential), so its codes
    depend only on the checkpoint, `quant` and `config`: a peer's equal a local model's.
    """
    if config.sequential:
        raise BadRequest("loading calibrates each block alone: it needs sequential=False")
    identity = calibration_cache.checkpoint_identity(r.source.path)
    paths = {i: calibration_cache.block_path(identity, quant, config, i) for i in range(start, end)}
    blocks = {}
    for i, path in paths.items():
        block = _float_block(r, i, torch.float32)
        if calibration_cache.load_block(path, block):
            blocks[i] = block
            if bar is not None:
                bar.update(1)
    missing = [i for i in paths if i not in blocks]
    if not missing:
        return blocks
    t0 = time.perf_counter()
    ids = _calibration_ids(r, identity, config)
    with torch.inference_mode():
        hidden = _load_client(r, torch.float32).embed(ids).float()
        positions = torch.arange(ids.shape[1])
        cos, sin = rope_cos_sin(rope_inv_freq(r.config), positions, hidden.dtype)
    # Blocks before the first missing one are streamed in fp32 only for their outputs.
    for i in range(max(missing) + 1):
        block = _float_block(r, i, torch.float32)
        if i in missing:
            hidden = calibrate_block(block, i, r.config.num_layers, hidden, cos, sin, quant, config)
            calibration_cache.save_block(paths[i], block)
            blocks[i] = block
            if bar is not None:
                bar.update(1)
        else:
            with torch.inference_mode():
                hidden = block(hidden, cos, sin)
    logger.info(
        "calibrated %s blocks %s on %dx%d sampled tokens in %.1fs (cached for the next load)",
        quant,
        ",".join(map(str, missing)),
        *ids.shape,
        time.perf_counter() - t0,
    )
    return blocks


def _load_span(
    r: _Reader,
    start: int,
    end: int,
    quant: str,
    dtype: torch.dtype,
    progress: bool,
    calibration: CalibrationConfig | None,
) -> BlockSpan:
    if quant not in QUANT_MODES:
        raise BadRequest(f"unknown quantization {quant!r}; choose one of {', '.join(QUANT_MODES)}")
    _check_range(r.config, start, end)
    t0 = time.perf_counter()
    with torch.device("meta"):
        span = BlockSpan(r.config, start, end)
    # Blocks start on "meta" and are materialised one at a time: peak is one block over the span.
    span.register_buffer("inv_freq", rope_inv_freq(r.config), persistent=False)
    bar = _progress(end - start, progress, f"loading blocks {start}:{end}")
    if quant in FOURBIT_MODES:
        blocks = _calibrated_blocks(r, start, end, quant, calibration or LOAD_CALIBRATION, bar)
        for i, block in blocks.items():
            for p in block.parameters():  # the norms: what is left in float after quantizing
                p.data = p.data.to(dtype)
            span.blocks[i - start] = block
    else:
        for i in range(start, end):
            block = _float_block(r, i, dtype)
            quantize_blocks_as(block, quant)
            span.blocks[i - start] = block
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    if quant != "none":
        _release_freed_memory()
    logger.info(
        "loaded blocks %d:%d of %s (%s) in %.2fs",
        start,
        end,
        r.source.name,
        quant,
        time.perf_counter() - t0,
    )
    return span.eval()


def load_span(
    source_or_str: str | ModelSource,
    start: int,
    end: int,
    *,
    quant: str = "none",
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    calibration: CalibrationConfig | None = None,
) -> BlockSpan:
    """Blocks [start, end) with their weights, reading only those blocks' tensors.

    quant: "none" keeps `dtype` weights; "int8" swaps the blocks' linear layers for `Int8Linear`;
    "nf4", "fp4" and "int4" for GPTQ-calibrated `FourBitLinear`s (and int8 k/v projections),
    cached on disk; "nf4-rtn", "fp4-rtn", "int4-rtn" for round-to-nearest ones.
    calibration: how 4-bit codes are calibrated (None: swarm.model.calibrate.LOAD_CALIBRATION).
    """
    with _open(source_or_str) as r:
        return _load_span(r, start, end, quant, dtype, progress, calibration)


def _load_client(r: _Reader, dtype: torch.dtype) -> ClientParts:
    config = r.config
    # Built on CPU, not "meta": the meta path of nn.Embedding's init costs seconds in torch 2.13.
    client = ClientParts(config).to(dtype)
    tensors = {
        "embed_tokens.weight": r.client_tensor("embed_tokens.weight", dtype),
        "norm.weight": r.client_tensor("norm.weight", dtype),
    }
    if not config.tie_word_embeddings:
        tensors["lm_head.weight"] = r.client_tensor("lm_head.weight", dtype)
    else:
        tensors["lm_head.weight"] = tensors["embed_tokens.weight"]
    _fill(client, tensors, "client parts")
    return client.eval()


def load_client_parts(
    source_or_str: str | ModelSource, dtype: torch.dtype = torch.float32
) -> ClientParts:
    """Embeddings, final norm and LM head only (what a client keeps)."""
    with _open(source_or_str) as r:
        return _load_client(r, dtype)


def load_model(
    source_or_str: str | ModelSource,
    quant: str = "none",
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    calibration: CalibrationConfig | None = None,
) -> LlamaModel:
    """The whole model in this process (local generation, the reference of distributed runs).

    quant, calibration: as load_span's (4-bit codes equal a peer's for the same blocks).
    """
    with _open(source_or_str) as r:
        client = _load_client(r, dtype)
        span = _load_span(r, 0, r.config.num_layers, quant, dtype, progress, calibration)
        return LlamaModel(r.config, client, span).eval()
