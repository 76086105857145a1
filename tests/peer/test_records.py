"""Span records and model entries: wire round trip, tolerance of new fields, rejection of bad ones.

Tests swarm/peer/records.py and the merge rule of swarm/peer/dht_view.py.
"""

import pytest

from swarm.peer.dht_view import _merge
from swarm.peer.records import ModelEntry, SpanRecord, block_key


def _record(**kw) -> SpanRecord:
    base = dict(
        peer_id="Qm1",
        start=2,
        end=5,
        state="online",
        throughput=12.5,
        cache_tokens_left=100,
        codecs=("none", "int8-block64"),
        quant="int8",
        version="0.1.0",
    )
    return SpanRecord(**{**base, **kw})


def test_round_trip():
    r = _record()
    assert SpanRecord.from_wire("Qm1", r.to_wire()) == r


def test_unknown_fields_are_tolerated_and_kept():
    version, state, tp, info = _record().to_wire()
    wire = (version + 1, state, tp, {**info, "bandwidth": {"x": 0.1}}, "future field")
    r = SpanRecord.from_wire("Qm1", wire)
    assert (r.start, r.end, r.throughput) == (2, 5, 12.5)
    assert r.extra == {"bandwidth": {"x": 0.1}}
    assert r.to_wire()[3]["bandwidth"] == {"x": 0.1}


def test_next_pings_round_trip_and_old_records():
    r = _record(next_pings={"QmB": 0.002, "QmC": 0.5})
    assert SpanRecord.from_wire("Qm1", r.to_wire()) == r
    assert hash(r) == hash(_record())  # records stay hashable; pings are advisory
    version, state, tp, info = r.to_wire()
    old = {k: v for k, v in info.items() if k != "next_pings"}  # a peer from before the field
    assert SpanRecord.from_wire("Qm1", (version, state, tp, old)).next_pings == {}


def test_bad_next_pings_are_dropped_not_the_record():
    version, state, tp, info = _record().to_wire()
    pings = {"QmB": 0.01, "QmC": -1.0, "QmD": float("inf"), 7: 0.1, "QmE": "fast"}
    r = SpanRecord.from_wire("Qm1", (version, state, tp, {**info, "next_pings": pings}))
    assert r.next_pings == {"QmB": 0.01}
    r = SpanRecord.from_wire("Qm1", (version, state, tp, {**info, "next_pings": [1, 2]}))
    assert r.next_pings == {} and r.start == 2
    with pytest.raises(ValueError, match="next_pings"):
        _record(next_pings={"QmB": float("nan")})


@pytest.mark.parametrize(
    "mutate",
    [
        lambda w: (w[0], "dancing", w[2], w[3]),
        lambda w: (w[0], w[1], float("nan"), w[3]),
        lambda w: (w[0], w[1], -1.0, w[3]),
        lambda w: (w[0], w[1], w[2], {**w[3], "start": 5, "end": 5}),
        lambda w: (w[0], w[1], w[2], {**w[3], "start": "0"}),
        lambda w: (w[0], w[1], w[2], {**w[3], "cache_tokens_left": -3}),
        lambda w: (w[0], w[1], w[2], "not a dict"),
        lambda w: (w[0], w[1]),
        lambda w: ("1", w[1], w[2], w[3]),
    ],
)
def test_bad_fields_are_rejected(mutate):
    with pytest.raises(ValueError):
        SpanRecord.from_wire("Qm1", mutate(_record().to_wire()))


A, B = (
    "QmWnNqtPrcQTVVCoXc1MdKvABPqyreCXVEyMPYEUeLUqZr",
    "QmScKK8SDffW2W6vp54URGb2s5zfZ3PdnBTHx2GifFhL9g",
)


def test_merge_prefers_the_live_span_over_tombstones():
    live = _record(peer_id=A, start=3, end=5)
    tomb = _record(peer_id=A, start=0, end=3, state="offline")
    fake = _record(peer_id="Qm1", throughput=1e9)  # not a peer id: nobody signed it
    found = {
        block_key("m", 0): {A: (tomb.to_wire(), 200.0), B: ("garbage", 100.0)},
        block_key("m", 3): {A: (live.to_wire(), 150.0), "Qm1": (fake.to_wire(), 300.0)},
    }
    records = _merge(found, "m", 6)
    assert records == [live]


def test_model_entry_round_trip():
    e = ModelEntry("tiny", 6, 64)
    assert ModelEntry.from_wire("tiny", e.to_wire()) == e
    with pytest.raises(ValueError):
        ModelEntry.from_wire("tiny", (1, 0, 64))


def test_reachability_round_trips_and_old_records_are_direct():
    relayed = _record(reachability="relayed", addrs=("/ip4/203.0.113.10/tcp/1/p2p/R/p2p-circuit",))
    assert SpanRecord.from_wire("Qm1", relayed.to_wire()) == relayed
    version, state, tp, info = _record().to_wire()
    assert "reachability" not in info  # direct peers' records read as before
    old = {k: v for k, v in info.items() if k != "reachability"}
    assert SpanRecord.from_wire("Qm1", (version, state, tp, old)).reachability == "direct"


def test_unknown_reachability_is_rejected():
    version, state, tp, info = _record().to_wire()
    with pytest.raises(ValueError, match="reachability"):
        SpanRecord.from_wire("Qm1", (version, state, tp, {**info, "reachability": "teleported"}))


def test_direct_port_round_trips_and_is_checked():
    rec = _record(direct_port=40123)
    version, state, tp, info = rec.to_wire()
    assert SpanRecord.from_wire("Qm1", (version, state, tp, info)).direct_port == 40123
    _, _, _, none = _record().to_wire()
    assert "direct_port" not in none  # peers without a channel: records read as before
    assert SpanRecord.from_wire("Qm1", (version, state, tp, none)).direct_port == 0
    for bad in (-1, 65536, "80", 1.5, True):
        with pytest.raises(ValueError, match="direct_port"):
            SpanRecord.from_wire("Qm1", (version, state, tp, {**info, "direct_port": bad}))


def test_direct_host_is_the_first_dialable_announced_host():
    from swarm.peer.client import direct_host

    circuit = "/ip4/203.0.113.10/tcp/1/p2p/R/p2p-circuit/p2p/Q"
    assert direct_host([circuit, "/ip4/0.0.0.0/tcp/2", "/ip4/198.51.100.7/tcp/3/p2p/Q"]) == (
        "198.51.100.7"
    )
    assert direct_host(["/ip6/2001:db8::1/tcp/3"]) == "2001:db8::1"
    assert direct_host([circuit]) is None and direct_host([]) is None
