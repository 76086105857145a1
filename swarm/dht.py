"""The one place a Swarm Mesh process starts its hivemind DHT node.

Every peer, trainer, client, status command, dashboard and benchmark calls `make_dht`, so what
all DHT nodes of the mesh must do alike (which values they accept) is decided here once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import hivemind


def make_dht(**kwargs: Any) -> hivemind.DHT:
    """Start a hivemind DHT node with the mesh's rules; `kwargs` are `hivemind.DHT`'s.

    `start` defaults to True (every caller wants a running node).
    """
    import hivemind  # here, not at import: CLIs answer --help without loading hivemind

    from swarm.dht_guard import DHTValueGuard, install_guard

    kwargs.setdefault("start", True)
    install_guard()  # before the DHT forks its node's process, which inherits it
    kwargs["record_validators"] = [*kwargs.get("record_validators", ()), DHTValueGuard()]
    return hivemind.DHT(**kwargs)
