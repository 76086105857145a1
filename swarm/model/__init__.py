"""Our own Llama-family model, split into client parts and blocks, and its loaders.

Used by the peer (a span of blocks), the client (embeddings and head) and local generation.
"""

from swarm.model.config import ModelConfig
from swarm.model.llama import Block, BlockSpan, ClientParts, KVCache, LlamaModel

__all__ = ["Block", "BlockSpan", "ClientParts", "KVCache", "LlamaModel", "ModelConfig"]
