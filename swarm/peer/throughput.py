"""Measures what one block computes per second on this machine, cached per machine and model.

Used by `swarm.peer.server.Peer` at start: the figures it announces and stage choice compares.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from swarm.model.llama import BlockSpan

logger = logging.getLogger(__name__)

FORWARD_TOKENS = 128  # tokens in the forward batch we time
INFERENCE_STEPS = 16  # single-token steps we time


@dataclass(frozen=True)
class BlockThroughput:
    """One block's speed: single-token inference steps/s and forward tokens/s."""

    inference_rps: float
    forward_tps: float


def default_cache_path() -> Path:
    root = os.environ.get("SWARM_MESH_CACHE") or Path.home() / ".cache" / "swarm_mesh"
    return Path(root) / "throughput.json"


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.node()}|{cpu}|{torch.get_num_threads()}t|torch{torch.__version__}"


def cache_key(model_prefix: str, span: BlockSpan, quant: str, dtype: torch.dtype) -> str:
    c = span.config
    shape = f"h{c.hidden_size}i{c.intermediate_size}a{c.num_heads}kv{c.num_kv_heads}"
    return f"{_machine()}|{model_prefix}|{shape}|{quant}|{dtype}"


def measure_block(span: BlockSpan, dtype: torch.dtype) -> BlockThroughput:
    """Time the span's first block: a forward batch, then single-token steps with a cache."""
    from swarm.model.llama import rope_cos_sin

    block = span.blocks[0]
    h = span.config.hidden_size
    cache = span.new_caches(1, INFERENCE_STEPS + 4, dtype=dtype)[0]
    with torch.inference_mode():
        x = torch.randn(1, FORWARD_TOKENS, h, dtype=dtype)
        pos = torch.arange(FORWARD_TOKENS)
        cos, sin = rope_cos_sin(span.inv_freq, pos, dtype)
        block(x, cos, sin)  # warm-up
        t0 = time.perf_counter()
        block(x, cos, sin)
        forward_tps = FORWARD_TOKENS / max(time.perf_counter() - t0, 1e-9)
        x1 = torch.randn(1, 1, h, dtype=dtype)
        cos, sin = rope_cos_sin(span.inv_freq, torch.arange(1), dtype)
        block(x1, cos, sin, 0, cache)  # warm-up
        t0 = time.perf_counter()
        for step in range(1, INFERENCE_STEPS + 1):
            cos, sin = rope_cos_sin(span.inv_freq, torch.arange(step, step + 1), dtype)
            block(x1, cos, sin, step, cache)
        inference_rps = INFERENCE_STEPS / max(time.perf_counter() - t0, 1e-9)
    return BlockThroughput(inference_rps, forward_tps)


def get_block_throughput(
    model_prefix: str,
    span: BlockSpan,
    quant: str,
    dtype: torch.dtype,
    cache_path: str | Path | None = None,
) -> BlockThroughput:
    """The cached figures for this machine and model, measuring (and caching) them if absent."""
    path = Path(cache_path) if cache_path else default_cache_path()
    key = cache_key(model_prefix, span, quant, dtype)
    cache: dict = {}
    try:
        cache = json.loads(path.read_text())
        if key in cache:
            return BlockThroughput(**cache[key])
    except (OSError, ValueError, TypeError):
        cache = cache if isinstance(cache, dict) else {}
    result = measure_block(span, dtype)
    logger.info(
        "measured one block: %.1f inference steps/s, %.0f forward tokens/s",
        result.inference_rps,
        result.forward_tps,
    )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        cache[key] = asdict(result)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=1))
        tmp.replace(path)  # atomic: peers starting together do not corrupt the file
    except OSError as e:
        logger.warning("could not cache throughput in %s: %s", path, e)
    return result
