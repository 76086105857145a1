"""What a user of the mesh holds: a model whose blocks are remote, sessions that survive peer loss.

Imports `swarm`; `swarm` never imports it.
"""

__all__ = [
    "DistributedModelForCausalLM",
    "InferenceSession",
    "RemoteInferenceSession",
    "RouterConfig",
]

_EXPORTS = {
    "DistributedModelForCausalLM": "petals_like.model",
    "InferenceSession": "petals_like.model",
    "RemoteInferenceSession": "petals_like.session",
    "RouterConfig": "petals_like.router",
}


def __getattr__(name: str):
    # Lazy, so `swarm-generate --local` does not pay for importing hivemind.
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'petals_like' has no attribute {name!r}")
