"""The live swarm dashboard: a JSON snapshot of who serves what, and the page that draws it.

Used by `swarm-peer status` (table, `--json`, `--web`) and by `swarm-api` (the page at `/`).
"""

from swarm.lazy import lazy_exports

__all__ = ["fetch_tables", "swarm_table", "dashboard_router", "serve_dashboard"]

_EXPORTS = {
    "fetch_tables": "swarm.dashboard.snapshot",
    "swarm_table": "swarm.dashboard.snapshot",
    "dashboard_router": "swarm.dashboard.web",
    "serve_dashboard": "swarm.dashboard.web",
}

# Lazy: the table needs no web framework, and the web part no DHT.
__getattr__ = lazy_exports(__name__, _EXPORTS)
