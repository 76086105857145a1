"""Circuit multiaddrs as p2pd decodes them, and reservations read from p2pd's autorelay log.

Tests swarm/peer/relay.py without starting p2pd (the namespace test runs the real thing).
"""

import io
import json

import base58
import pytest

from swarm.errors import Unreachable
from swarm.peer.relay import RelayedDaemon, circuit_maddr, circuit_text, relay_parts

RELAY_ID = "12D3KooWGTuMTU8LUDuXKGiJ5fFYWriYWn51E4mGyJhhztE961UB"
PEER_ID = "12D3KooWGuck8JkFXQYRoeVNybJDav1pfnybSQ9C2MygePBpNbx7"
RELAY = f"/ip4/203.0.113.10/tcp/31337/p2p/{RELAY_ID}"


def test_circuit_text_and_parts():
    assert relay_parts(RELAY) == ("/ip4/203.0.113.10/tcp/31337", RELAY_ID)
    assert circuit_text(RELAY, PEER_ID) == f"{RELAY}/p2p-circuit/p2p/{PEER_ID}"
    with pytest.raises(ValueError, match="/p2p/PEER_ID"):
        relay_parts("/ip4/203.0.113.10/tcp/31337")


def test_circuit_maddr_writes_the_peer_id_as_a_raw_multihash():
    raw = base58.b58decode(RELAY_ID)
    data = circuit_maddr(circuit_text(RELAY, PEER_ID)).to_bytes()
    # /p2p/ (421) then the multihash's length and bytes, as go-multiaddr reads it; no CIDv1.
    assert data.endswith(b"\xa5\x03" + bytes([len(raw)]) + raw + b"\xa2\x02")
    with pytest.raises(ValueError, match="p2p-circuit"):
        circuit_maddr(RELAY)


def _daemon_with_log(lines: list[str]) -> RelayedDaemon:
    d = RelayedDaemon([RELAY, "/ip4/203.0.113.11/tcp/1/p2p/OTHER"], ["/ip4/198.51.100.2/tcp/0"])
    d.peer_id = PEER_ID
    d._log = io.BytesIO("\n".join(lines).encode())
    return d


def _entry(msg: str, peer: str) -> str:
    return json.dumps({"level": "debug", "logger": "autorelay", "msg": msg, "id": peer})


def test_reservations_follow_the_autorelay_log():
    d = _daemon_with_log(
        ["Peer ID: x", _entry("adding new relay", RELAY_ID), _entry("adding new relay", "OTHER")]
    )
    assert d.circuit_addrs() == [
        circuit_text(RELAY, PEER_ID),
        circuit_text("/ip4/203.0.113.11/tcp/1/p2p/OTHER", PEER_ID),
    ]
    d._log = io.BytesIO(
        (d._log.getvalue().decode() + "\n" + _entry("disconnected from relay", RELAY_ID)).encode()
    )
    assert d.reserved() == ["/ip4/203.0.113.11/tcp/1/p2p/OTHER"]


def test_no_reservation_is_a_clear_error():
    d = _daemon_with_log(["{not json", _entry("found node", RELAY_ID)])
    with pytest.raises(Unreachable, match="--announce-maddrs"):
        d.wait_reserved(0.3)
    with pytest.raises(Unreachable, match="--initial-peers"):
        RelayedDaemon([], ["/ip4/198.51.100.2/tcp/0"]).start()
    with pytest.raises(Unreachable, match="--initial-peers"):
        RelayedDaemon([circuit_text(RELAY, PEER_ID)], ["/ip4/198.51.100.2/tcp/0"]).start()


def test_dial_maddr_drops_the_target_and_keeps_circuits_decodable():
    from swarm.peer.relay import dial_maddr

    assert str(dial_maddr(RELAY)) == "/ip4/203.0.113.10/tcp/31337"
    circuit = circuit_text(RELAY, PEER_ID)
    assert dial_maddr(circuit).to_bytes() == circuit_maddr(circuit).to_bytes()
