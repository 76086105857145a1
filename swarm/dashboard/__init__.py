"""The live swarm dashboard: a JSON snapshot of who serves what, and the page that draws it.

Used by `swarm-peer status` (table, `--json`, `--web`) and by `swarm-api` (the page at `/`).
"""

__all__ = ["fetch_tables", "swarm_table", "dashboard_router", "serve_dashboard"]

_EXPORTS = {
    "fetch_tables": "swarm.dashboard.snapshot",
    "swarm_table": "swarm.dashboard.snapshot",
    "dashboard_router": "swarm.dashboard.web",
    "serve_dashboard": "swarm.dashboard.web",
}


def __getattr__(name: str):
    # Lazy: the table needs no web framework, and the web part no DHT.
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'swarm.dashboard' has no attribute {name!r}")
