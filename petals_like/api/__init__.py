"""The OpenAI-compatible API over the swarm: /v1/models, /v1/completions, /v1/chat/completions.

Used by the `swarm-api` command (petals_like.api.cli); `create_app` builds the FastAPI app.
"""

from swarm.lazy import lazy_exports

__all__ = ["ApiConfig", "Engine", "create_app"]

_EXPORTS = {
    "ApiConfig": "petals_like.api.cli",
    "Engine": "petals_like.api.engine",
    "create_app": "petals_like.api.app",
}

__getattr__ = lazy_exports(__name__, _EXPORTS)
