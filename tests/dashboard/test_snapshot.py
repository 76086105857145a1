"""The swarm table behind `swarm-peer status` and the dashboard: peers, coverage, round trips.

Tests swarm/dashboard/snapshot.py (the page itself is tested in tests/api/test_scenario_api.py).
"""

from __future__ import annotations

import pytest

from swarm.dashboard.snapshot import reachability, swarm_table
from swarm.peer.records import SpanRecord


def test_table_lists_peers_coverage_and_what_nobody_serves():
    records = [
        SpanRecord("b", 0, 3, throughput=5.0, next_pings={"c": 0.002}),
        SpanRecord("c", 3, 4, state="offline"),
        SpanRecord("d", 2, 4, quant="int8", run_id="run1"),
    ]
    t = swarm_table("m", 6, records, rtts={"b": 0.0031})
    assert [(p["peer_id"], p["start"], p["end"]) for p in t["peers"]] == [
        ("b", 0, 3),
        ("d", 2, 4),
        ("c", 3, 4),
    ]
    b = t["peers"][0]
    assert (b["rtt_ms"], b["next_pings_ms"], b["reachability"]) == (3.1, {"c": 2.0}, "direct")
    assert t["peers"][1]["rtt_ms"] is None and t["peers"][1]["run_id"] == "run1"
    assert [len(x["peers"]) for x in t["blocks"]] == [1, 1, 2, 2, 0, 0]
    assert t["uncovered"] == [4, 5]  # block 3's only other peer is offline, but d serves it


def test_reachability_comes_from_the_record_and_defaults_to_direct():
    assert reachability(SpanRecord("a", 0, 1)) == "direct"
    relayed = SpanRecord.from_wire(
        "a", (1, "online", 1.0, {"start": 0, "end": 1, "reachability": "relayed"})
    )
    assert reachability(relayed) == "relayed"
    with pytest.raises(ValueError, match="reachability"):
        SpanRecord.from_wire("a", (1, "online", 1.0, {"start": 0, "end": 1, "reachability": 7}))
