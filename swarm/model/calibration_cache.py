"""On-disk cache of calibrated 4-bit blocks and of the sampled calibration text, per checkpoint.

Used by swarm.model.loading: calibrating costs a pass over the checkpoint, a second load reads
the codes back. Files live under $SWARM_MESH_CACHE (or ~/.cache/swarm_mesh)/calibrated/.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from swarm.model.fourbit import FourBitLinear
from swarm.model.int8 import Int8Linear
from swarm.model.llama import Block

logger = logging.getLogger(__name__)

_FORMAT = 2  # bump when the codes a config gives change, so old files are never read


def cache_root() -> Path:
    """The project's cache folder (the same one the peer's throughput cache uses)."""
    return Path(os.environ.get("SWARM_MESH_CACHE") or Path.home() / ".cache" / "swarm_mesh")


def checkpoint_identity(path: Path) -> str:
    """A short hash naming a checkpoint file or folder: its path and each file's size and mtime
    (rewriting the checkpoint gives a new identity; reading it whole would cost too much).
    """
    path = Path(path).resolve()
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    stats = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return hashlib.sha256(json.dumps([str(path), stats]).encode()).hexdigest()[:16]


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps([_FORMAT, *parts], default=str).encode()).hexdigest()[:24]


def ids_path(identity: str, config) -> Path:
    """Where the calibration ids sampled for `config` (a CalibrationConfig) are kept."""
    sampler = (config.sequences, config.length, config.seed, config.temperature, config.top_p)
    return cache_root() / "calibrated" / identity / f"ids-{_key(*sampler)}.safetensors"


def block_path(identity: str, quant: str, config, index: int) -> Path:
    """Where block `index`'s codes for `quant` under `config` are kept."""
    name = f"block{index}-{quant}-{_key(quant, dataclasses.asdict(config), index)}.safetensors"
    return cache_root() / "calibrated" / identity / name


def _write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    # Written beside and renamed: a reader never sees half a file (two peers may calibrate).
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def save_ids(path: Path, ids: torch.Tensor) -> None:
    _write(path, {"ids": ids}, {})


def load_ids(path: Path) -> torch.Tensor | None:
    """The cached ids, or None when absent or unreadable (then they are sampled again)."""
    try:
        with safe_open(str(path), "pt") as f:
            return f.get_tensor("ids")
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:
        if path.exists():
            logger.warning("ignoring unreadable calibration cache %s: %s", path, e)
        return None


def save_block(path: Path, block: Block) -> None:
    """The quantized linear layers of `block` (their buffers and which kind each is)."""
    layout, tensors = {}, {}
    for name, m in block.named_modules():
        if isinstance(m, FourBitLinear):
            layout[name] = m.kind
        elif isinstance(m, Int8Linear):
            layout[name] = "int8"
        else:
            continue
        for b, t in m.named_buffers(recurse=False):
            tensors[f"{name}.{b}"] = t
    _write(path, tensors, {"layout": json.dumps(layout)})


def load_block(path: Path, block: Block) -> bool:
    """Swap, in place, the nn.Linear layers of the float `block` for the cached quantized ones;
    False (block untouched) when there is no usable cache file.
    """
    try:
        with safe_open(str(path), "pt") as f:
            layout = json.loads(f.metadata()["layout"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:
        if path.exists():
            logger.warning("ignoring unreadable calibration cache %s: %s", path, e)
        return False
    linears = {n for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    if set(layout) != linears:
        logger.warning("ignoring calibration cache %s: it is for other layers", path)
        return False
    new = {}
    for name, kind in layout.items():
        lin = block.get_submodule(name)
        if not isinstance(lin, nn.Linear):
            return False
        args = (lin.in_features, lin.out_features, lin.bias is not None)
        q = Int8Linear(*args) if kind == "int8" else FourBitLinear(*args, kind=kind)
        for b in list(q._buffers):
            key = f"{name}.{b}"
            if key in tensors:
                setattr(q, b, tensors[key])
        new[name] = q
    for name, q in new.items():
        parent, _, attr = name.rpartition(".")
        setattr(block.get_submodule(parent), attr, q)
    return True
