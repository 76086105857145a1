"""`swarm-peer status`: the JSON object and the table say who is direct and who is relayed.

Tests swarm_table and the table printer of swarm/cli/peer.py on records (no swarm needed).
"""

from swarm.cli.peer import _print_table
from swarm.dashboard.snapshot import swarm_table
from swarm.peer.records import SpanRecord

CIRCUIT = "/ip4/203.0.113.10/tcp/1/p2p/R/p2p-circuit/p2p/nat-peer-id"


def test_status_marks_relayed_peers(capsys):
    records = [
        SpanRecord(
            "direct-peer-id", 0, 3, addrs=("/ip4/203.0.113.10/tcp/1/p2p/R",), direct_port=40123
        ),
        SpanRecord("nat-peer-id", 3, 6, reachability="relayed", addrs=(CIRCUIT,)),
    ]
    table = swarm_table("tiny", 6, records)
    by_id = {p["peer_id"]: p for p in table["peers"]}
    assert by_id["direct-peer-id"]["reachability"] == "direct"
    assert by_id["nat-peer-id"]["reachability"] == "relayed"
    assert by_id["nat-peer-id"]["addrs"] == [CIRCUIT]
    assert (by_id["direct-peer-id"]["direct_port"], by_id["nat-peer-id"]["direct_port"]) == (
        40123,
        0,
    )
    _print_table(table)
    out = capsys.readouterr().out
    assert "reach" in out.splitlines()[1]
    assert "relayed" in next(line for line in out.splitlines() if "at-peer-id" in line)
