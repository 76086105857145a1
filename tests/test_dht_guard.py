"""Tests of swarm/dht_guard.py: the scan of raw DHT values, and a real swarm an attacker's DHT node
feeds msgpack bombs (the peer, `swarm-peer status` and a generation must all go on working).
"""

from __future__ import annotations

import inspect
import json
import multiprocessing as mp
import random
import re
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import hivemind
import msgpack
import pytest
from hivemind.dht.crypto import DHTRecord, RecordValidatorBase
from hivemind.dht.routing import DHTID
from hivemind.dht.storage import DictionaryDHTValue
from hivemind.dht.validation import CompositeValidator
from hivemind.utils.serializer import MSGPackSerializer

from swarm.dht import make_dht
from swarm.dht_guard import (
    DICTIONARY_LIMITS,
    VALUE_LIMITS,
    DHTValueGuard,
    GuardedMSGPackSerializer,
    Limits,
    UnsafeDHTValue,
    guard_active,
    scan,
)
from swarm.peer.records import MODELS_KEY, ModelEntry, SpanRecord, block_key
from swarm.training.progress import ReplicaProgress
from tests.conftest import REPO

PEER_ID = "12D3KooW" + "A" * 44  # as long as a real base58 peer id


def bomb(depth: int) -> bytes:
    """A tuple nested `depth` deep, hand-written as hivemind would pack it (ext 0x40 of a list)."""
    heads, size = [], 1  # from the inside out; the innermost object is nil
    for _ in range(depth):
        n = size + 1  # the list of one item around what is inside
        if n < 1 << 8:
            head = b"\xc7" + n.to_bytes(1, "big")
        elif n < 1 << 16:
            head = b"\xc8" + n.to_bytes(2, "big")
        else:
            head = b"\xc9" + n.to_bytes(4, "big")
        heads.append(head + b"\x40\x91")
        size = n + len(head) + 1
    return b"".join(reversed(heads)) + b"\xc0"


def largest_record() -> SpanRecord:
    """The biggest span record we write: 32 next_pings, 8 relayed addrs, every field set."""
    return SpanRecord(
        PEER_ID,
        0,
        30,
        throughput=123.4,
        cache_tokens_left=10**9,
        codecs=("none", "int8-block64", "int8-dynamic"),
        quant="int8",
        version="0.1.0+g0123456",
        inference_rps=1.5,
        forward_tps=900.0,
        addrs=tuple(f"/ip4/10.0.0.{i}/tcp/31337/p2p/{PEER_ID}/p2p-circuit" for i in range(8)),
        run_id="r" * 64,
        reachability="relayed",
        next_pings={f"12D3KooW{i:044d}": 0.012345 for i in range(32)},
    )


def refused(buf: bytes, **kw) -> str:
    with pytest.raises(UnsafeDHTValue) as e:
        scan(buf, **kw)
    return str(e.value)


# ---- the scan ---------------------------------------------------------------------------------


def test_bombs_are_refused_without_recursion():
    assert len(bomb(500)) < 2500  # the attack: 2.4 KB
    assert "deeper than 16" in refused(bomb(500))
    deep = bomb(100_000)
    assert "bytes, over" in refused(deep)
    # Refused for its depth too, when size is not what stops it, in bounded time.
    wide = Limits(max_bytes=10**7, max_depth=16, max_len=4096, max_objects=10**6)
    t0 = time.perf_counter()
    assert "deeper than 16" in refused(deep, limits=wide)
    assert time.perf_counter() - t0 < 0.1
    with pytest.raises(UnsafeDHTValue):
        GuardedMSGPackSerializer.loads(bomb(500))  # what hivemind's protocol calls


@pytest.mark.parametrize(
    "head",
    [b"\xdd", b"\xdf", b"\xc6", b"\xdb", b"\xc9"],  # array32, map32, bin32, str32, ext32
    ids=["array", "map", "bin", "str", "ext"],
)
def test_huge_lengths_declared_in_a_short_buffer_are_refused(head):
    why = refused(head + b"\xff\xff\xff\xff" + b"\x00" * 16)
    assert "over 4096" in why or "truncated" in why or "declared" in why, why
    # A length within max_len but beyond the bytes that follow.
    assert "declared" in refused(b"\xdc\x04\x00" + b"\x01" * 10)


@pytest.mark.parametrize(
    "buf, why",
    [
        (b"\xc1", "invalid msgpack byte"),
        (msgpack.packb([1]) + b"x", "after the value"),
        (msgpack.packb({1: 2}), "map key"),
        (b"\xa2\xff\xfe", "UTF-8"),
        (msgpack.packb(msgpack.ExtType(0x40, b"\x01")), "not an array"),
        (msgpack.packb(msgpack.ExtType(0x51, b"\x90")), "ext type 0x51"),
        (msgpack.packb(msgpack.Timestamp(1, 0)), "ext type 0xff"),  # a timestamp
        (MSGPackSerializer.dumps(DictionaryDHTValue()), "ext type 0x50"),  # only whole, at top
        (msgpack.packb(msgpack.ExtType(0x40, b"\x92\x01\x02\x03")), "inside an ext payload"),
        (b"\x92\x01", "declared in 1 bytes"),
        (b"\xcb\x00", "truncated"),
        (b"", "truncated"),
    ],
)
def test_what_decoding_would_raise_on_is_refused(buf, why):
    assert why in refused(buf)
    assert DHTValueGuard().validate(DHTRecord(b"k", b"\xc0", buf, 1e12)) is False


def test_our_records_pass_and_round_trip():
    record = largest_record()
    wire = MSGPackSerializer.dumps(record.to_wire())
    print(f"largest span record: {len(wire)} bytes (limit {VALUE_LIMITS.max_bytes})")
    assert len(wire) * 16 < VALUE_LIMITS.max_bytes  # a wide margin
    assert SpanRecord.from_wire(PEER_ID, GuardedMSGPackSerializer.loads(wire)) == record
    entry = ModelEntry("smollm2-135m", 30, 576)
    progress = ReplicaProgress(PEER_ID, epoch=7, samples=1024, throughput=3.5, queue=2)
    for value in (entry.to_wire(), progress.to_wire(), None, True, 2.5, PEER_ID.encode()):
        assert GuardedMSGPackSerializer.loads(MSGPackSerializer.dumps(value)) == value
    # A block key as a find reply carries it: 300 peers' records, as opaque bytes.
    whole = DictionaryDHTValue()
    for i in range(300):
        whole.store(f"{PEER_ID[:-4]}{i:04d}", wire, 1e12 + i)
    buf = MSGPackSerializer.dumps(whole)
    assert len(buf) > VALUE_LIMITS.max_bytes and len(buf) < DICTIONARY_LIMITS.max_bytes
    back = GuardedMSGPackSerializer.loads(buf)
    assert isinstance(back, DictionaryDHTValue) and len(list(back.items())) == 300
    # Subkeys as hivemind averaging and we write them, and hivemind's reserved ones.
    for subkey in (PEER_ID, PEER_ID.encode(), None):
        scan(MSGPackSerializer.dumps(subkey))


def test_whatever_passes_the_scan_decodes():
    """Random corruptions of real values: each one the scan passes, hivemind decodes."""
    seeds = [
        MSGPackSerializer.dumps(largest_record().to_wire()),
        MSGPackSerializer.dumps(ModelEntry("tiny", 6, 64).to_wire()),
    ]
    rng = random.Random(0)
    passed = 0
    for _ in range(1500):
        buf = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(buf))
            if rng.random() < 0.7:
                buf[at] = rng.randrange(256)
            else:
                del buf[at]
        try:
            scan(bytes(buf))
        except UnsafeDHTValue:
            continue
        MSGPackSerializer.loads(bytes(buf))  # must not raise
        passed += 1
    assert 50 < passed < 1500  # some corruptions are harmless, most are not


def test_guard_validates_last_on_the_stripped_value():
    class Envelope(RecordValidatorBase):  # as a signer does: bytes around the value
        def validate(self, record):
            return record.value.startswith(b"SIG")

        def strip_value(self, record):
            return record.value[3:]

        @property
        def priority(self):
            return 20

    both = CompositeValidator([DHTValueGuard(), Envelope()])
    good = MSGPackSerializer.dumps(largest_record().to_wire())
    assert both.validate(DHTRecord(b"k", MSGPackSerializer.dumps(PEER_ID), b"SIG" + good, 1e12))
    assert not both.validate(DHTRecord(b"k", b"\xa1x", b"SIG" + bomb(500), 1e12))
    assert not both.validate(DHTRecord(b"k", bomb(500), b"SIG" + good, 1e12))  # a bad subkey
    assert not DHTValueGuard().validate(DHTRecord(b"k", b"\xc0", good, float("nan")))


# hivemind 1.1.12's decode sites of network values (install_guard's docstring names them).
DECODE_SITES = {
    ("dht/protocol.py", "value_dictionary = self.serializer.loads(value_bytes)"),
    ("dht/protocol.py", "subkey = self.serializer.loads(tag)"),
    ("dht/protocol.py", "value_dictionary = self.serializer.loads(result.value)"),
    (
        "dht/node.py",
        "self.future.set_result(ValueWithExpiration(self.serializer.loads(value_bytes), "
        "self.expiration_time))",
    ),
    ("dht/node.py", "self.serializer.loads(value_bytes), item_expiration_time"),
    ("dht/schema.py", "deserialized_value = DHTProtocol.serializer.loads(record.value)"),
    ("dht/schema.py", "deserialized_subkey = DHTProtocol.serializer.loads(record.subkey)"),
    ("dht/storage.py", "maxsize, latest_expiration_time, items = MSGPackSerializer.loads(raw)"),
}


def test_hivemind_decodes_only_where_the_guard_expects():
    """If this fails, hivemind changed under install_guard: audit the new decode sites."""
    assert hivemind.__version__ == "1.1.12"
    root = Path(hivemind.__file__).parent
    found = set()
    for path in sorted((root / "dht").glob("*.py")):
        for line in path.read_text().splitlines():
            if re.search(r"\b(loads|unpackb|unpack)\(", line) and "def " not in line:
                found.add((str(path.relative_to(root)), line.strip()))
    assert found == DECODE_SITES
    from hivemind.dht import node, protocol

    # The node's searches decode with the protocol's serializer (the one install_guard sets).
    assert "serializer=self.protocol.serializer" in inspect.getsource(node.DHTNode.get_many_by_id)
    assert protocol.DHTProtocol.serializer in (MSGPackSerializer, GuardedMSGPackSerializer)
    assert issubclass(hivemind.DHT, mp.context.ForkProcess)  # the guard is inherited by fork


# ---- readers of our keys ----------------------------------------------------------------------


def test_garbage_under_our_keys_is_skipped_by_every_reader():
    """Valid msgpack that passes the guard but is no record: status, routing, balancer, training."""
    from hivemind.utils import get_dht_time

    from petals_like.routing import find_route
    from swarm.dashboard.snapshot import fetch_tables
    from swarm.peer import balancer
    from swarm.peer.dht_view import fetch_models, fetch_swarm
    from swarm.training.optim8bit import AdamConfig
    from swarm.training.progress import (
        TrainerRecord,
        fetch_progress,
        fetch_trainers,
        progress_key,
        run_key,
    )

    garbage = [
        7,
        "x",
        None,
        [1, 2],
        {"a": [1]},
        (1, "online", 1.0),  # too short
        (1, "online", 1.0, {"start": 2, "end": 1}),  # empty span
        (1, "online", 1.0, {"start": 0, "end": 1 << 40}),  # a span no model has
        (1, "online", float("nan"), {"start": 0, "end": 3}),
        (1, "online", 1.0, {"start": 0, "end": 3, "codecs": 5}),
        (1, ["online"], 1.0, {"start": 0, "end": 3}),
        (1, "online", 1.0, {"start": 0, "end": 3, "addrs": [1]}),
        (1, 1 << 40, 64),  # as a model entry: too many blocks for anyone to read
        (1, 6, -1),
        [0, 0, 0, 0.0, 0],  # a progress record of version 0
        [1, -5, 0, "fast", 0],
        [1, 0, {}, 0, 0, 0, 0, 0],  # a trainer record with no optimizer
    ]
    dht = make_dht(host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
    # A second node signs garbage under its own peer id: records pass the signature check, so
    # only the readers' parsing stands between them and status, routing and training.
    boot = [str(a) for a in dht.get_visible_maddrs()]
    other = make_dht(initial_peers=boot, host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
    try:
        me, stranger = dht.peer_id.to_base58(), other.peer_id.to_base58()
        good = SpanRecord(me, 0, 3, throughput=5.0, inference_rps=10.0, cache_tokens_left=100)
        exp = get_dht_time() + 60
        progress, run = progress_key("run", 0, 3), run_key("run")
        trainer = TrainerRecord(me, 8, AdamConfig(1e-3, 0.9, 0.99, 1e-8, 0.0))
        honest = [
            *[(block_key("tiny", b), me, good.to_wire()) for b in range(3)],
            (MODELS_KEY, f"tiny|{me}", ModelEntry("tiny", 3, 64).to_wire()),
            (progress, me, ReplicaProgress(me, 1, 8).to_wire()),
            (run, me, trainer.to_wire()),
        ]
        for key, subkey, value in honest:
            assert dht.store(key, value, exp, subkey=subkey)
        # Unsigned, under subkeys that are no peer id: nodes store them, readers skip them.
        for i, value in enumerate(garbage):
            for key in (block_key("tiny", i % 3), MODELS_KEY, progress, run):
                assert dht.store(key, value, exp, subkey=f"tiny|{me[:-3]}{i:03d}")
        # Subkeys of other types (at other expirations: hivemind's storage heap compares
        # (expiration, subkey) pairs, and a tie between a str and a bytes subkey raises).
        assert dht.store(block_key("tiny", 0), good.to_wire(), exp + 1, subkey=b"bytes")
        assert dht.store(MODELS_KEY, (1, 6, 64), exp + 2, subkey=("not", "a", "str"))

        def readers_see_only_the_honest_records() -> None:
            records = fetch_swarm(dht, "tiny", 3)
            assert records == [good]
            assert fetch_models(dht) == [ModelEntry("tiny", 3, 64)]
            tables = fetch_tables(dht, None, 10.0)
            assert [p["peer_id"] for p in tables[0]["peers"]] == [me] and not tables[1:]
            assert [(h.start, h.end) for h in find_route(records, 0, 3)] == [(0, 3)]
            assert balancer.uncovered_blocks(records, 3) == []
            assert balancer.should_move(records, 3, me) is None
            assert list(fetch_progress(dht, "run", (0, 3), 10.0)) == [me]
            assert fetch_trainers(dht, "run", 10.0) == [trainer]

        readers_see_only_the_honest_records()
        for i, value in enumerate(garbage):  # signed garbage, one value at a time
            keys = (block_key("tiny", i % 3), MODELS_KEY, progress, run)
            for key in keys:
                sub = f"tiny|{stranger}" if key == MODELS_KEY else stranger
                assert other.store(key, value, exp + 3 + i, subkey=sub), (key, value)
            readers_see_only_the_honest_records()
    finally:
        other.shutdown()
        dht.shutdown()


# ---- a real swarm and an attacker -------------------------------------------------------------
# Coroutines run in the attacker's DHT process (DHT.run_coroutine pickles them): module level.


class _RawDictionary(DictionaryDHTValue):
    """An attacker's stored 'dictionary' whose packed form is whatever bytes it likes."""

    payload = b""

    def packb(self) -> bytes:
        return self.payload


async def _unguard(_dht, _node) -> None:
    """The attacker runs hivemind as shipped (this test process may have installed the guard)."""
    from hivemind.dht.protocol import DHTProtocol

    DHTProtocol.serializer = MSGPackSerializer


async def _attack(_dht, node, target: str, keys: list[str], raw_key: str, payload: bytes) -> dict:
    """Put the bomb on the wire every way a DHT node can; return what the target answered."""
    from hivemind.p2p import PeerID
    from hivemind.proto import dht_pb2
    from hivemind.utils import get_dht_time

    peer, exp, out = PeerID.from_base58(target), get_dht_time() + 300, {}
    for key in keys:  # a value under a subkey: stored raw, decoded by every reader of the key
        kid = DHTID.generate(key)
        node.protocol.storage.store_subkey(kid, "evil", payload, exp)  # we answer finds with it
        ok = await node.protocol.call_store(peer, [kid], [payload], exp, subkeys=["evil"])
        out[key] = None if ok is None else list(ok)

    async def raw_store(key: str, tag: bytes, value: bytes):
        request = dht_pb2.StoreRequest(
            keys=[DHTID.generate(key).to_bytes()],
            subkeys=[tag],
            values=[value],
            expiration_time=[exp],
            in_cache=[False],
            peer=node.protocol.node_info,
        )
        try:
            reply = await node.protocol.get_stub(peer).rpc_store(request, timeout=5)
            return list(reply.store_ok)
        except Exception as e:  # the target refused the whole request
            return type(e).__name__

    # The bomb as a subkey, and as a whole dictionary (ext 0x50) with the bomb for a subkey.
    whole = b"\x93\xc0" + msgpack.packb(exp) + b"\x91\x93" + payload + b"\xc4\x00"
    whole += msgpack.packb(exp)
    ext = b"\xc8" + len(whole).to_bytes(2, "big") + b"\x50" + whole
    out["tag"] = await raw_store(keys[0], payload, b"\xc0")
    out["dictionary"] = await raw_store(keys[0], b"", ext)
    # A key whose find reply is that dictionary: readers decode it before any validator.
    MSGPackSerializer._ext_types[_RawDictionary] = 0x50
    raw = _RawDictionary()
    raw.payload = whole
    node.protocol.storage.store(DHTID.generate(raw_key), raw, exp)
    return out


def _status(maddrs: list[str], *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "swarm.cli.peer", "status", "--initial-peers", *maddrs, *flags],
        capture_output=True,
        timeout=60,
        cwd=REPO,
        text=True,
    )


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_scenario_dht_bombs_leave_the_swarm_serving(tiny_model_dir, peer_factory):
    from petals_like.model import DistributedModelForCausalLM
    from swarm.generation import generate_local
    from swarm.model.loading import load_model

    peer = peer_factory(
        "join",
        *("--model", str(tiny_model_dir), "--stage", "auto", "--num-blocks", "6"),
        *("--quant", "none", "--announce-period", "1", "--rebalance-period", "1"),
        *("--max-start-delay", "0"),
    )
    maddrs = peer.wait_maddrs(90)
    peer.wait_log("serving blocks", 120)
    name = tiny_model_dir.name
    attacker = hivemind.DHT(initial_peers=maddrs, host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
    dht = None
    try:
        attacker.run_coroutine(_unguard)
        keys = [block_key(name, 0), MODELS_KEY]
        attack = partial(_attack, target=peer.peer_id, keys=keys, raw_key="swarm_mesh.bomb")
        answers = attacker.run_coroutine(partial(attack, payload=bomb(500)))
        # The peer refused all of it (stored, it would crash whoever reads the key).
        assert answers[keys[0]] == [False] and answers[MODELS_KEY] == [False], answers
        assert answers["tag"] == [False], answers
        assert answers["dictionary"] not in ([True], None), answers

        # The peer reads the bombs through the attacker's find replies each rebalance period.
        time.sleep(3)
        assert peer.proc.poll() is None, peer.log_tail()
        assert sorted(peer.children_alive()) == sorted(peer.noted_children), peer.log_tail()
        assert len(peer.noted_children) >= 2  # its DHT process and p2pd

        out = _status(maddrs, "--json")  # no --model: it reads the model list, then the blocks
        assert out.returncode == 0, out.stderr[-2000:]
        table = json.loads(out.stdout)
        assert table["model"] == name and table["uncovered"] == []
        assert [p["peer_id"] for p in table["peers"]] == [peer.peer_id]

        dht = make_dht(initial_peers=maddrs, client_mode=True, start=True)
        assert dht.run_coroutine(guard_active)  # in the DHT's own (forked) process
        found = dht.get("swarm_mesh.bomb", latest=True, return_future=True).result(30)
        assert found is None  # the attacker's reply was refused
        assert dht.is_alive()

        prompt = [5, 17, 42, 8]
        want = generate_local(
            load_model(str(tiny_model_dir), progress=False), None, prompt, 4, stop_on_eos=False
        )
        with DistributedModelForCausalLM.from_pretrained(
            str(tiny_model_dir), maddrs, compression="none"
        ) as model:
            out = model.generate(prompt, max_new_tokens=4, stop_on_eos=False)
        assert out[0, len(prompt) :].tolist() == want
        assert peer.proc.poll() is None and dht.is_alive() and attacker.is_alive()
    finally:
        if dht is not None:
            dht.shutdown()
        attacker.shutdown()
