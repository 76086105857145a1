"""Server-to-server push with real peer processes on 127.0.0.1: three hops, push text == relay
text == local, a push from a peer that is not the previous hop refused, pushes on one push
stream (in order, refusals answered, bad input refused, unary for a peer without the stream),
a SIGKILLed middle peer.

The tests share one swarm (module scope: a 0:2, b and b2 2:4, c 4:6) and run in file order:
the last one kills a middle peer.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time

import pytest
import torch

from petals_like.model import DistributedModelForCausalLM
from petals_like.router import RouterConfig
from proto import peer_pb2
from swarm.errors import BadRequest
from swarm.generation import generate_local
from swarm.link import NO_LINK
from swarm.peer import streams, wire
from swarm.peer.push import Pushes
from tests.conftest import PeerProcess, Swarm
from tests.conftest import connect as shared_connect

pytestmark = pytest.mark.slow

PROMPT = [5, 17, 42, 8, 60, 11, 99, 23]
NEW = 16


@pytest.fixture(scope="module")
def swarm(swarm_factory) -> Swarm:
    # fp32 peers: the text is compared with the local fp32 model's
    return swarm_factory({"a": "0:2", "b": "2:4", "b2": "2:4", "c": "4:6"})


@pytest.fixture(scope="module")
def local_model(tiny_model_dir):
    from swarm.model.loading import load_model

    return load_model(str(tiny_model_dir), progress=False)


def connect(swarm: Swarm, model_dir, push: bool, **kw) -> DistributedModelForCausalLM:
    return shared_connect(
        swarm, model_dir, router_config=RouterConfig(compression="none", push=push), **kw
    )


def generate(model, on_token=None) -> tuple[list[int], int]:
    with model.inference_session(max_length=len(PROMPT) + NEW) as session:
        out = model.generate(PROMPT, max_new_tokens=NEW, stop_on_eos=False, on_token=on_token)
        pushed = session._remote.pushed_steps
    return out[0, len(PROMPT) :].tolist(), pushed


@pytest.mark.timeout(300)
def test_scenario_push_text_equals_relay_and_local(swarm, tiny_model_dir, local_model):
    want = generate_local(local_model, None, PROMPT, NEW, stop_on_eos=False)
    texts = {}
    for push in (True, False):
        with connect(swarm, tiny_model_dir, push) as model:
            texts[push], pushed = generate(model)
            assert len(model.last_stats.route) == 3
            assert not model.last_stats.failovers
            assert model.last_stats.verify_checks  # verification works on pushed outputs
        # The prefill goes through us (it sets up the streams); every token after it is pushed.
        assert pushed == (NEW - 1 if push else 0)
    assert texts[True] == texts[False] == want


@pytest.mark.timeout(300)
def test_scenario_direct_channel_text_equals_libp2p(swarm, tiny_model_dir, local_model):
    """Peers announce a direct channel (swarm.peer.direct): the client's streams and the peers'
    pushes go there, and the text is the one libp2p gives, and local's."""
    ports = [r.direct_port for r in swarm.online()]
    assert all(port > 0 for port in ports)
    want = generate_local(local_model, None, PROMPT, NEW, stop_on_eos=False)
    texts, opened = {}, {}
    for direct in (True, False):
        rc = RouterConfig(compression="none", push=True, direct=direct)
        with shared_connect(swarm, tiny_model_dir, router_config=rc) as model:
            tickets = model.router.client._tickets  # written in the model's loop thread
            deadline = time.monotonic() + 10
            while direct and len(tickets) < len(ports) and time.monotonic() < deadline:
                time.sleep(0.05)
            # Asked for when the router read the records, before any stream (none with libp2p).
            assert len(tickets) == (len(ports) if direct else 0)
            texts[direct], pushed = generate(model)
            opened[direct] = model.router.client.direct_streams
            assert len(model.last_stats.route) == 3 and not model.last_stats.failovers
            if direct:  # a second generation's streams go on the first one's connections
                assert generate(model) == (texts[direct], pushed)
                assert model.router.client.direct_streams == 6
                assert model.router.client.direct_connections == 3
        assert pushed == NEW - 1
    assert texts[True] == texts[False] == want
    assert opened == {True: 3, False: 0}  # one inference stream per hop
    # Peers push to their next hop on its direct channel (a, and the middle peer used).
    logs = "".join((swarm.logs / f"{name}.log").read_text() for name in swarm.peers)
    # (Opened by the first push, or ahead: each peer does so for its nearest next hops.)
    assert len(re.findall(r"opened( ahead)? on the direct channel", logs)) >= 2
    assert not re.search(r"opened( ahead)? on libp2p", logs)


@pytest.mark.timeout(300)
def test_scenario_a_refused_direct_channel_falls_back_to_libp2p(swarm, tiny_model_dir, local_model):
    """Tickets the peers never gave (a restarted peer's, say): every channel refuses the hello,
    each stream opens on libp2p instead, and the text is unchanged."""
    want = generate_local(local_model, None, PROMPT, NEW, stop_on_eos=False)
    ports = {r.peer_id: r.direct_port for r in swarm.online()}
    rc = RouterConfig(compression="none", push=True)
    with shared_connect(swarm, tiny_model_dir, router_config=rc) as model:
        client = model.router.client
        for peer_id, port in ports.items():
            forged = peer_pb2.DirectTicket(
                ticket_id=os.urandom(16), secret=os.urandom(32), port=port
            )
            client._tickets[peer_id] = (forged, time.monotonic() + 3600)
        text, pushed = generate(model)
        route = {h.peer_id for h in model.last_stats.route}
        # Each stream sent its hello and first message at once (no round trip to wait for the
        # answer), heard the refusal at its first read, and opened again on libp2p.
        assert client.direct_streams == client.direct_refusals == 3
        assert route <= set(client._direct_down)
        assert not model.last_stats.failovers
    assert text == want and pushed == NEW - 1


async def _foreign_push(swarm: Swarm, target: str, declared_prev: str) -> None:
    """Open a session on `target` (blocks 0:2) declaring `declared_prev` as its previous hop,
    then push into it from a third peer id (neither that hop nor the session's client): refused
    with BadRequest, and the session still steps."""
    from hivemind.p2p import P2P, PeerID

    from swarm.peer.client import PeerClient
    from swarm.peer.handler import PeerHandler

    client = PeerClient(await swarm.dht.replicate_p2p())
    stream = await client.open_inference(target, 0, 2, max_length=8, prev_peer=declared_prev)
    p2p = await P2P.create(initial_peers=swarm.boot)  # the bootstrap peer is `target`
    try:
        assert stream.supports_push
        x = torch.randn(1, 2, 64)
        msg = peer_pb2.PushStep(
            session_id=stream.session_id, hidden=wire.encode(x, "none"), position=0
        )
        stub = PeerHandler.get_stub(p2p, PeerID.from_base58(target))
        reply = await stub.rpc_push(msg, timeout=10)
        assert reply.HasField("error")
        with pytest.raises(BadRequest, match="not the previous hop"):
            raise wire.error_from_wire(reply.error, target)
        out = await stream.step(x, 0, timeout=10)  # the peer keeps serving the session
        assert out.shape == x.shape
    finally:
        await stream.close()
        await p2p.shutdown()


@pytest.mark.timeout(120)
def test_scenario_push_from_a_peer_that_is_not_the_previous_hop_is_refused(
    swarm, tiny_model_dir, local_model
):
    hidden = local_model.config.hidden_size
    assert hidden == 64, "the test's tensor assumes the tiny model"
    asyncio.run(_foreign_push(swarm, swarm.peers["a"].peer_id, swarm.peers["b"].peer_id))


def _pushes(p2p, stream_name: str = "rpc_push_stream") -> Pushes:
    from swarm.peer.handler import PeerHandler

    name = PeerHandler._get_handle_name(None, stream_name)
    pushes = Pushes(NO_LINK, None, PeerHandler.get_stub, 10.0, stream_name=name)
    pushes.p2p = p2p
    return pushes


def _push_msg(session_id: str, x: torch.Tensor, position: int) -> peer_pb2.PushStep:
    return peer_pb2.PushStep(
        session_id=session_id, hidden=wire.encode(x, "none"), position=position
    )


async def _push_and_step(pushes: Pushes, peer, pushed, plain, x: torch.Tensor, pos: int) -> None:
    """Push `x` (position `pos`) into session `pushed`, then step it: its output is that of the
    same step sent to session `plain`, bit for bit."""
    await pushes.start(peer, _push_msg(pushed.session_id, x, pos))
    got = await pushed.step(x, pos, timeout=10, pushed=True)
    assert torch.equal(got, await plain.step(x, pos, timeout=10))


async def _stream_pushes(swarm: Swarm, target: str) -> None:
    """The session's client pushes each step's input on one push stream, then steps it: the
    outputs are a plain session's, bit for bit; a foreign peer's pushes on its own push stream
    are refused in order and that stream stays open; a peer without the stream gets unary."""
    from hivemind.p2p import P2P, PeerID

    from swarm.peer.client import PeerClient

    client = PeerClient(await swarm.dht.replicate_p2p())
    pushed = await client.open_inference(target, 0, 2, max_length=8)
    plain = await client.open_inference(target, 0, 2, max_length=8)
    foreign = await P2P.create(initial_peers=swarm.boot)
    peer = PeerID.from_base58(target)
    # (Unary calls go out from `foreign`: a replica of the DHT's P2P made in a later event loop
    # loses unary replies, tests/peer/test_rpc.py.)
    mine, theirs, old = _pushes(client.p2p), _pushes(foreign), _pushes(foreign, "rpc_nope")
    try:
        x = torch.randn(1, 4, 64)
        for pos in range(3):
            await _push_and_step(mine, peer, pushed, plain, x[:, pos : pos + 1], pos)
        # The three went on one stream, none unary.
        assert list(mine._channels) == [peer] and mine._channels[peer].ready
        assert not mine._unary_only
        for _ in range(2):  # refused, answered, and the stream goes on
            with pytest.raises(BadRequest, match="not the previous hop"):
                await theirs.start(peer, _push_msg(pushed.session_id, x[:, 3:], 3))
        assert theirs._channels[peer].ready
        # A peer that serves no push stream (here: a name it does not serve) gets rpc_push,
        # whose answer comes back (a refusal: `foreign` is not the previous hop).
        with pytest.raises(BadRequest, match="not the previous hop"):
            await old.start(peer, _push_msg(pushed.session_id, x[:, 3:], 3))
        assert peer in old._unary_only and not old._channels[peer].ready
        await _push_and_step(mine, peer, pushed, plain, x[:, 3:], 3)
    finally:
        for p in (mine, theirs, old):
            p.close()
        await pushed.close()
        await plain.close()
        await foreign.shutdown()


@pytest.mark.timeout(120)
def test_scenario_pushes_share_one_stream_in_order(swarm, tiny_model_dir, local_model):
    asyncio.run(_stream_pushes(swarm, swarm.peers["a"].peer_id))


async def _warm_push(swarm: Swarm, target: str) -> None:
    """A push stream opened ahead (Pushes.warm, what a peer does for its nearest next hops
    each announce period) is ready before the first push, which goes on it: the pushed
    step's output is a plain session's, bit for bit."""
    from hivemind.p2p import PeerID

    from swarm.peer.client import PeerClient

    client = PeerClient(await swarm.dht.replicate_p2p())
    pushed = await client.open_inference(target, 0, 2, max_length=8)
    plain = await client.open_inference(target, 0, 2, max_length=8)
    peer = PeerID.from_base58(target)
    pushes = _pushes(client.p2p)
    try:
        pushes.warm([target])
        channel = pushes._channels[peer]
        async with asyncio.timeout(10):
            while not channel.ready:
                await asyncio.sleep(0.01)
        pushes.warm([target])  # one stream per next hop: an open one is kept
        assert pushes._channels[peer] is channel
        await _push_and_step(pushes, peer, pushed, plain, torch.randn(1, 1, 64), 0)
        assert pushes._channels[peer] is channel and channel.ready  # the push went on it
    finally:
        pushes.close()
        await pushed.close()
        await plain.close()


@pytest.mark.timeout(120)
def test_scenario_a_push_stream_opened_ahead_carries_the_first_push(
    swarm, tiny_model_dir, local_model
):
    asyncio.run(_warm_push(swarm, swarm.peers["a"].peer_id))


async def _refused_push(swarm: Swarm, target: str) -> None:
    """A push on a direct channel that refuses its hello (a stale ticket) is sent again on
    libp2p: nothing is lost, the pushed step's output is a plain session's, bit for bit, and
    later pushes go on the new stream."""
    from hivemind.p2p import P2P, PeerID

    from swarm.peer.client import PeerClient

    # A P2P of its own: tickets are unary calls, which a replica of the DHT's P2P made in a
    # later event loop loses (tests/peer/test_rpc.py).
    p2p = await P2P.create(initial_peers=swarm.boot)
    client = PeerClient(p2p)
    client.learn_addrs(swarm.online())  # the target's direct channel
    pushed = await client.open_inference(target, 0, 2, max_length=8)
    plain = await client.open_inference(target, 0, 2, max_length=8)
    assert client.direct_streams == 2  # both sessions' streams are direct
    port = client._tickets[target][0].port
    client._tickets[target] = (
        peer_pb2.DirectTicket(ticket_id=os.urandom(16), secret=os.urandom(32), port=port),
        time.monotonic() + 3600,
    )
    peer = PeerID.from_base58(target)
    pushes = _pushes(client.p2p)
    pushes.opener, pushes.refused = client.open_stream, client.refused
    try:
        x = torch.randn(1, 3, 64)
        for pos in range(3):
            await _push_and_step(pushes, peer, pushed, plain, x[:, pos : pos + 1], pos)
        # The first push's stream was refused at its first read; it went again on libp2p.
        assert client.direct_streams == 3 and client.direct_refusals == 1
        assert target in client._direct_down and pushes._channels[peer].ready
    finally:
        pushes.close()
        await pushed.close()
        await plain.close()
        await p2p.shutdown()


@pytest.mark.timeout(120)
def test_scenario_a_push_refused_by_the_direct_channel_goes_again_on_libp2p(
    swarm, tiny_model_dir, local_model
):
    asyncio.run(_refused_push(swarm, swarm.peers["a"].peer_id))


async def _bad_push_stream(swarm: Swarm, target: str) -> None:
    """A push declaring more parts than a peer takes is refused on the stream, which ends; the
    peer keeps serving."""
    from hivemind.p2p import P2P, PeerID
    from hivemind.proto.p2pd_pb2 import RPCError

    from swarm.peer.client import PeerClient
    from swarm.peer.handler import PeerHandler

    p2p = await P2P.create(initial_peers=swarm.boot)
    try:
        name = PeerHandler._get_handle_name(None, "rpc_push_stream")
        _, reader, writer = await p2p.call_binary_stream_handler(PeerID.from_base58(target), name)
        writer.write(streams.frame(peer_pb2.Part(count=wire.MAX_PARTS, data=b"x" * 100)))
        reply = await asyncio.wait_for(
            streams.receive(reader, peer_pb2.PushResponse, 1 << 16, RPCError), 10
        )
        assert reply.HasField("error")
        with pytest.raises(BadRequest, match="more than this peer accepts"):
            raise wire.error_from_wire(reply.error, target)
        with pytest.raises(asyncio.IncompleteReadError):  # the stream ended
            await asyncio.wait_for(reader.readexactly(1), 10)
        writer.close()
        x = torch.randn(1, 2, 64)  # the peer serves on
        assert (await PeerClient(p2p).forward(target, x, 0, 2, timeout=30)).shape == x.shape
    finally:
        await p2p.shutdown()


@pytest.mark.timeout(120)
def test_scenario_push_stream_refuses_an_oversized_push(swarm, tiny_model_dir, local_model):
    asyncio.run(_bad_push_stream(swarm, swarm.peers["a"].peer_id))


@pytest.mark.timeout(300)
def test_scenario_push_sigkill_middle_peer_gives_the_same_tokens(
    swarm, tiny_model_dir, local_model
):
    want = generate_local(local_model, None, PROMPT, NEW, stop_on_eos=False)
    killed: list[float] = []
    victim: list[PeerProcess] = []
    after: list = []  # the last hop's stream when the kill came
    # Verification at its default: on_sampled counts steps (on_token waits for the checks).
    with connect(swarm, tiny_model_dir, push=True) as model:
        with model.inference_session(max_length=len(PROMPT) + NEW) as session:

            def on_sampled(_token) -> None:
                on_sampled.count = getattr(on_sampled, "count", 0) + 1
                if on_sampled.count == 6:
                    hop = next(h for h in session.route if h.start == 2)
                    victim.append(swarm.by_peer_id(hop.peer_id))
                    after.append(session._remote._hops[-1].stream)
                    os.kill(victim[0].pid, signal.SIGKILL)  # the process only, as a crash
                    killed.append(time.monotonic())

            out = model.generate(
                PROMPT, max_new_tokens=NEW, stop_on_eos=False, on_sampled=on_sampled
            )
            pushed = session._remote.pushed_steps
            last = session._remote._hops[-1].stream
        stats = model.last_stats
    assert killed, "the peer was not killed"
    assert out[0, len(PROMPT) :].tolist() == want
    assert len(stats.failovers) == 1, "\n".join(f.summary() for f in stats.failovers)
    f = stats.failovers[0]
    assert f.blocks == (2, 4) and f.peer_id == victim[0].peer_id
    # The hop after the lost one kept its session (not reopened, not replayed).
    assert f.kept_hops == 1, f.summary()
    assert last is after[0], "the last hop's stream was reopened"
    tail = f"...{str(last.peer)[-6:]}"
    assert not any(k.startswith("stepped") and tail in k for k in f.phases), f.phases
    # Pushed before the kill and again after the step that replayed and the one that told the
    # kept hop its new previous hop (through us: a push racing that step was refused, once).
    assert pushed >= NEW - 3, pushed
    gap = stats.token_times[6] - killed[0]
    print(f"push failover: {f.summary()}; next token {gap * 1000:.0f} ms after the kill")
    assert gap < 5.0  # the goal is < 1 s; this shared 2-core machine can stall for seconds
