"""Checkpoint readers (Hugging Face safetensors folders, GGUF files) and model-name resolution.

Used by `swarm.model.loading`, which is the public face; import from there.
"""

from swarm.model.loaders.gguf import GGUFFile
from swarm.model.loaders.hf import HFCheckpoint
from swarm.model.loaders.resolve import DEFAULT_MODEL, ModelSource, resolve_model

__all__ = ["DEFAULT_MODEL", "GGUFFile", "HFCheckpoint", "ModelSource", "resolve_model"]
