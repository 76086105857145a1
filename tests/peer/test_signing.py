"""Signed DHT records: the validator on its own, real DHT nodes refusing forgeries, and a real
peer that forged records neither hide nor outbid. Tests swarm/signing.py and swarm/dht.py.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from functools import partial

import hivemind
import pytest
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.p2p import P2P, PeerID
from hivemind.utils import MSGPackSerializer, get_dht_time

from swarm.dht import make_dht
from swarm.peer.dht_view import fetch_models, fetch_swarm
from swarm.peer.records import MODELS_KEY, ModelEntry, SpanRecord, block_key
from swarm.signing import PeerSignatureValidator, is_peer_id, load_identity, owner_of, seal
from tests.conftest import REPO, wait_for


def identity(tmp_path, name: str) -> tuple[bytes, str]:
    """(DER private key, base58 peer id) of a fresh identity file, as libp2p computes the id."""
    path = str(tmp_path / name)
    P2P.generate_identity(path)
    with open(path, "rb") as f:
        return load_identity(path), PeerID.from_identity(f.read()).to_base58()


def record(subkey: str, value: object, expiration: float, key: str = "m.0") -> DHTRecord:
    dumps = MSGPackSerializer.dumps
    return DHTRecord(DHTID.generate(key).to_bytes(), dumps(subkey), dumps(value), expiration)


def test_peer_ids_and_owners():
    pid = "QmWnNqtPrcQTVVCoXc1MdKvABPqyreCXVEyMPYEUeLUqZr"
    assert is_peer_id(pid) and not is_peer_id(pid[:-1] + "0") and not is_peer_id("fake-peer")
    assert owner_of(pid) == pid and owner_of(f"model|{pid}") == pid
    assert owner_of("model") is None and owner_of(pid.encode()) is None


def test_the_validator_takes_the_owners_records_and_refuses_forgeries(tmp_path):
    (mine, me), (theirs, them) = identity(tmp_path, "a"), identity(tmp_path, "b")
    signer, reader = PeerSignatureValidator(mine), PeerSignatureValidator(None)
    assert signer.peer_id == me
    value = SpanRecord(me, 0, 3, throughput=10.0).to_wire()
    good = record(me, value, get_dht_time() + 60)
    signed = DHTRecord(good.key, good.subkey, signer.sign_value(good), good.expiration_time)
    assert reader.validate(signed) and reader.validate(signed)  # the second from the cache
    assert MSGPackSerializer.loads(reader.strip_value(signed)) == value
    assert signer.sign_value(record("model|" + me, 1, 5.0)) != MSGPackSerializer.dumps(1)
    assert signer.sign_value(record(them, 1, 5.0)) == MSGPackSerializer.dumps(1)  # not ours

    def forged(**change) -> DHTRecord:
        return dataclasses.replace(signed, **change)

    assert not reader.validate(good)  # unsigned, under a peer id
    assert not reader.validate(forged(value=signed.value[:-1] + b"\x00"))  # value changed
    assert not reader.validate(forged(expiration_time=signed.expiration_time + 3600))  # replay
    assert not reader.validate(forged(key=DHTID.generate("m.1").to_bytes()))  # another block
    # A valid signature of someone else's key, under our subkey: the key is not the subkey's.
    stolen = record(me, SpanRecord(me, 0, 3, state="offline").to_wire(), get_dht_time() + 3600)
    assert not reader.validate(dataclasses.replace(stolen, value=seal(theirs, stolen)))
    # Subkeys that name no peer are not protected: readers of the mesh ignore them.
    assert reader.validate(record("fake-peer", value, 1.0))
    # A peer id in a non-canonical msgpack string (str32) is still that peer's subkey.
    long_form = b"\xdb" + len(me).to_bytes(4, "big") + me.encode()
    assert not reader.validate(DHTRecord(good.key, long_form, good.value, 1.0))
    assert not reader.validate(DHTRecord(good.key, b"\xd9\x40" + me.encode(), good.value, 1.0))
    assert not reader.validate(forged(value=b"SMs1\xff\xff"))  # truncated envelope


async def _raw_store(_dht, node, args: tuple) -> list[bool] | None:
    """Store raw bytes (peer, key, subkey, value, expiration) on one node, as a hostile node can."""
    peer, key, subkey, value, expiration = args
    ok = await node.protocol.call_store(
        PeerID.from_base58(peer), [DHTID.generate(key)], [value], expiration, subkeys=[subkey]
    )
    return None if ok is None else list(ok)


@pytest.mark.timeout(60)
def test_dht_nodes_refuse_forged_records_and_keep_the_owners(tmp_path):
    honest = make_dht(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    boot = [str(m) for m in honest.get_visible_maddrs()]
    hostile = hivemind.DHT(initial_peers=boot, host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
    reader = make_dht(initial_peers=boot, client_mode=True)
    try:
        me, key = honest.peer_id.to_base58(), block_key("signed", 0)
        ok = SpanRecord(me, 0, 1, throughput=5.0)
        assert honest.store(key, ok.to_wire(), get_dht_time() + 60, subkey=me)
        forged = SpanRecord(me, 0, 1, state="offline").to_wire()
        later = get_dht_time() + 3600
        theirs, _ = identity(tmp_path, "thief")
        for value in (
            MSGPackSerializer.dumps(forged),  # unsigned
            seal(theirs, record(me, forged, later, key)),  # signed by another key
        ):
            stored = hostile.run_coroutine(partial(_raw_store, args=(me, key, me, value, later)))
            assert stored == [False]
        # The honest node still serves its owner's record; unowned subkeys are stored (and
        # readers drop them, so a fake peer wins nothing).
        fake = SpanRecord("fake-peer", 0, 1, throughput=1e9).to_wire()
        args = (me, key, "fake-peer", MSGPackSerializer.dumps(fake), later)
        stored = hostile.run_coroutine(partial(_raw_store, args=args))
        assert stored == [True]
        (got,) = fetch_swarm(reader, "signed", 1, 10)
        assert (got.peer_id, got.state, got.throughput) == (me, "online", 5.0)
        entry = ModelEntry("signed", 1, 64)
        assert honest.store(MODELS_KEY, entry.to_wire(), later, subkey=f"signed|{me}")
        hostile.store(MODELS_KEY, (1, 99, 64), later, subkey=f"signed|{me}")  # kept by itself
        assert fetch_models(reader, 10) == [entry]
    finally:
        for d in (reader, hostile, honest):
            d.shutdown()


class Forger(RecordValidatorBase):
    """An attacker's node: signs every record it stores with its own key, accepts anything."""

    def __init__(self, private_der: bytes):
        self.private_der = private_der

    def validate(self, record: DHTRecord) -> bool:
        return True

    def sign_value(self, record: DHTRecord) -> bytes:
        return seal(self.private_der, record)


async def _held(_dht, node, key: str) -> dict:
    """subkey -> (value bytes, expiration) of what this node itself stores under `key`."""
    found = node.protocol.storage.get(DHTID.generate(key))
    if found is None:
        return {}
    return {sub: (bytes(v), float(exp)) for sub, (v, exp) in found.value.items()}


def _status(boot: list[str], model: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "swarm.cli.peer", "status", "--initial-peers", *boot]
        + ["--model", model, "--json"],
        capture_output=True,
        timeout=120,
        cwd=REPO,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_scenario_forged_records_neither_hide_a_peer_nor_win_routing(
    tiny_model_dir, peer_factory, tmp_path
):
    from petals_like.model import DistributedModelForCausalLM

    args = ["join", "--model", str(tiny_model_dir), "--stage", "0:6", "--max-start-delay", "0"]
    peer = peer_factory(*args, "--announce-period", "2")
    boot = peer.wait_maddrs(120)
    real, name = peer.peer_id, tiny_model_dir.name
    thief, _ = identity(tmp_path, "thief")
    _, fake_id = identity(tmp_path, "fake")
    local = ["/ip4/127.0.0.1/tcp/0"]
    liar = hivemind.DHT(initial_peers=boot, host_maddrs=local, start=True)  # sends anything
    forger = hivemind.DHT(
        initial_peers=boot, host_maddrs=local, record_validators=[Forger(thief)], start=True
    )
    reader = make_dht(initial_peers=boot, client_mode=True)
    try:
        wait_for(
            lambda: [r.state for r in fetch_swarm(reader, name, 6)] == ["online"],
            120,
            0.5,
            "online",
        )
        prompt = [5, 17, 42, 8]
        with DistributedModelForCausalLM.from_pretrained(str(tiny_model_dir), boot) as model:
            before = model.generate(prompt, max_new_tokens=8, stop_on_eos=False).tolist()

        later = get_dht_time() + 3600  # outlives every record the real peer will write
        offline = SpanRecord(real, 0, 6, state="offline").to_wire()
        addrs = tuple(str(m) for m in liar.get_visible_maddrs())

        def huge(pid: str) -> tuple:
            return SpanRecord(pid, 0, 6, throughput=1e9, forward_tps=1e9, addrs=addrs).to_wire()

        for b in range(6):
            key = block_key(name, b)
            liar.store(key, offline, later, subkey=real)  # unsigned, under the real peer
            liar.store(key, huge(fake_id), later, subkey=fake_id)  # unsigned fake peer
            liar.store(key, huge("fake-peer"), later, subkey="fake-peer")  # not even a peer id
            forger.store(key, offline, later, subkey=real)  # signed, by another peer's key
        # The forgeries are out there: the attackers' own nodes hold them, past the real ones.
        held = liar.run_coroutine(partial(_held, key=block_key(name, 0)))
        assert {real, fake_id, "fake-peer"} <= set(held) and held[real][1] == later, held
        assert forger.run_coroutine(partial(_held, key=block_key(name, 0)))[real][1] == later

        time.sleep(4)  # two announce periods: the real peer re-announced over them
        table = _status(boot, name)
        assert [(p["peer_id"], p["state"]) for p in table["peers"]] == [(real, "online")], table
        assert table["uncovered"] == []
        with DistributedModelForCausalLM.from_pretrained(str(tiny_model_dir), boot) as model:
            after = model.generate(prompt, max_new_tokens=8, stop_on_eos=False).tolist()
            route = model.last_stats.route
        assert after == before
        assert [(str(h.peer_id), h.start, h.end) for h in route] == [(real, 0, 6)]
    finally:
        for d in (reader, forger, liar):
            d.shutdown()
