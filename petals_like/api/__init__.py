"""The OpenAI-compatible API over the swarm: /v1/models, /v1/completions, /v1/chat/completions.

Used by the `swarm-api` command (petals_like.api.cli); `create_app` builds the FastAPI app.
"""

__all__ = ["ApiConfig", "Engine", "create_app"]

_EXPORTS = {
    "ApiConfig": "petals_like.api.cli",
    "Engine": "petals_like.api.engine",
    "create_app": "petals_like.api.app",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'petals_like.api' has no attribute {name!r}")
