"""Command-line entry points of the swarm package (`swarm-peer`, `swarm-train`).

Each module builds its parser from the component's config dataclass.
"""
