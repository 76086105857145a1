"""What a user of the mesh holds: a model whose blocks are remote, sessions that survive peer loss.

Imports `swarm`; `swarm` never imports it.
"""

from swarm.lazy import lazy_exports

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

# Lazy, so `swarm-generate --local` does not pay for importing hivemind.
__getattr__ = lazy_exports(__name__, _EXPORTS)
