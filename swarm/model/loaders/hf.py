"""A Hugging Face checkpoint folder read lazily: config.json, then tensors one by one by name.

Used by `swarm.model.loading`; handles `model.safetensors` and a sharded index.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from swarm.errors import CheckpointError

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError as e:
        raise CheckpointError(f"{path.name} not found in {path.parent}") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return data


class HFCheckpoint:
    """A folder's weight map (tensor name -> file); `tensor(name)` opens only the file it is in."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"checkpoint folder not found: {self.folder}")
        index = self.folder / INDEX_FILE
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index} has no weight_map")
            self.weight_map: dict[str, str] = {str(k): str(v) for k, v in weight_map.items()}
        elif (self.folder / SINGLE_FILE).is_file():
            with self._open(SINGLE_FILE) as f:
                self.weight_map = {name: SINGLE_FILE for name in f.keys()}
        else:
            raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {self.folder}")
        self._handles: dict[str, Any] = {}

    def _open(self, filename: str) -> Any:
        path = self.folder / filename
        if not path.is_file():
            raise CheckpointError(f"checkpoint shard {filename} is missing from {self.folder}")
        try:
            return safe_open(str(path), framework="pt")
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"corrupt safetensors file {path}: {e}") from e

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def tensor(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Read one tensor by its HF name (e.g. `model.layers.3.mlp.up_proj.weight`)."""
        filename = self.weight_map.get(name)
        if filename is None:
            raise CheckpointError(f"checkpoint {self.folder.name} has no tensor {name!r}")
        if filename not in self._handles:
            self._handles[filename] = self._open(filename)
        try:
            return self._handles[filename].get_tensor(name).to(dtype)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"cannot read {name} from {filename}: {e}") from e

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> HFCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
