"""The one place a Swarm Mesh process starts its hivemind DHT node.

Every peer, trainer, client, status command, dashboard and benchmark calls `make_dht`, so what
all DHT nodes of the mesh must do alike (which values they accept) is decided here once.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import hivemind


def make_dht(**kwargs: Any) -> hivemind.DHT:
    """Start a hivemind DHT node with the mesh's rules; `kwargs` are `hivemind.DHT`'s.

    `start` defaults to True (every caller wants a running node). Raw values are scanned before
    hivemind decodes them (`swarm.dht_guard`). Every node signs the records it stores under its
    own peer id and refuses unsigned or forged ones (`swarm.signing`), so it always has an
    identity: `identity_path`, else a fresh one, deleted once p2pd has read it. With `p2p`
    given, `identity_path` is that daemon's key file (without, the node cannot sign).
    """
    import hivemind  # here, not at import: CLIs answer --help without loading hivemind
    from hivemind.p2p import P2P

    from swarm.dht_guard import DHTValueGuard, install_guard
    from swarm.signing import (
        PeerSignatureValidator,
        discard_identity,
        fresh_identity,
        load_identity,
    )

    kwargs.setdefault("start", True)
    if kwargs.get("p2p") is not None:
        identity = kwargs.pop("identity_path", None)  # hivemind takes no daemon options with p2p
    else:
        given = kwargs.get("identity_path")
        identity = given or fresh_identity()
        if not os.path.isfile(identity):  # made here, not in the DHT's process: we sign with it
            P2P.generate_identity(identity)
            given = None
        if given is None:  # a key made this instant is nobody else's (hivemind would dial to ask)
            kwargs.setdefault("check_if_identity_free", False)
        kwargs["identity_path"] = identity
    signer = PeerSignatureValidator(load_identity(identity) if identity is not None else None)
    install_guard()  # before the DHT forks its node's process, which inherits it
    # The signer checks first and strips its envelope; the guard sees the inner value last.
    kwargs["record_validators"] = [signer, *kwargs.get("record_validators", ()), DHTValueGuard()]
    dht = hivemind.DHT(**kwargs)
    if kwargs["start"]:
        discard_identity(identity)  # a fresh one: p2pd has read it and the signer holds it
        if signer.peer_id and dht.peer_id.to_base58() != signer.peer_id:
            dht.shutdown()
            raise ValueError(f"{identity} is not the key of this DHT node's peer id")
    return dht
