"""The peer: serves a span of blocks over hivemind P2P and announces it on the DHT.

Used by the `swarm-peer` CLI, by clients in `petals_like` and by the SWARM trainer. Its face: the
RPC client, the records and their DHT reader, the peer's config (imported lazily: hivemind is
heavy).
"""

from swarm.lazy import lazy_exports

__all__ = [
    "PeerClient",
    "PeerConfig",
    "SpanRecord",
    "fetch_swarm",
    "fetch_swarm_async",
    "format_blocks",
]

_EXPORTS = {
    "PeerClient": "swarm.peer.client",
    "PeerConfig": "swarm.peer.config",
    "SpanRecord": "swarm.peer.records",
    "fetch_swarm": "swarm.peer.dht_view",
    "fetch_swarm_async": "swarm.peer.dht_view",
    "format_blocks": "swarm.peer.records",
}

__getattr__ = lazy_exports(__name__, _EXPORTS)
