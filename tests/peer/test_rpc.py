"""The peer's RPCs against real peer processes on 127.0.0.1: results, streams and bad input.

Tests swarm/peer/handler.py through swarm/peer/client.py (two peers, blocks 0:3 and 3:6).
"""

from __future__ import annotations

import asyncio
import time

import hivemind
import pytest
import pytest_asyncio
import torch

from proto import peer_pb2
from swarm.errors import BadRequest, CacheFull, SessionExpired
from swarm.link import Link
from swarm.model.loading import load_model
from swarm.peer import wire
from swarm.peer.client import PeerClient, as_peer_id
from swarm.peer.dht_view import fetch_swarm_async
from swarm.peer.handler import PeerHandler

# One event loop for the module: a second P2P replica of the same DHT daemon, made after the
# first one's loop closed, loses unary replies (seen here: forward timed out).
pytestmark = [pytest.mark.timeout(180), pytest.mark.asyncio(loop_scope="module")]
PEER_LINK_DELAY = 0.02  # peer b's emulated link (swarm-peer join --link-delay)


@pytest.fixture(scope="module")
def swarm2(swarm_factory):
    """Two peers (0:3 bootstrap, 3:6) and a client-mode DHT; everything killed by pid after."""
    common = [
        "--quant",
        "none",  # fp32 peers: replies are compared with the local fp32 model
        "--announce-period",
        "2",
        "--cache-tokens",
        "256",
        "--max-request-tokens",
        "512",
        "--session-timeout",
        "20",  # long enough that a loaded CI machine never expires a live test session
    ]
    # Every reply of b pays its emulated link.
    extra = {"b": ["--link-delay", str(PEER_LINK_DELAY)]}
    s = swarm_factory({"a": "0:3", "b": "3:6"}, flags=common, extra=extra)
    return s.dht, [s.peers["a"].peer_id, s.peers["b"].peer_id]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_model(tiny_model_dir, progress=False)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client(swarm2):
    dht, _ = swarm2
    p2p = await dht.replicate_p2p()
    return PeerClient(p2p)


async def _still_serving(client: PeerClient, peer: str) -> None:
    x = torch.randn(1, 2, 64)
    assert (await client.forward(peer, x, 0, 3, timeout=30)).shape == x.shape


async def test_info(client, swarm2):
    info = await client.info(swarm2[1][1])
    assert (info.start, info.end, info.state, info.num_blocks) == (3, 6, "online", 6)
    assert "int8-block64" in info.codecs and info.cache_tokens_left == 256


async def test_ping(client, swarm2):
    rtt = await client.ping(swarm2[1][1], timeout=5)
    assert 0 < rtt < 5


async def test_next_pings_are_announced(swarm2, tiny_model_dir):
    # Peer 0:3 times peer 3:6 (which serves block 3, right after its span) every period.
    dht, (a, b) = swarm2
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    while True:
        records = await fetch_swarm_async(dht, tiny_model_dir.name, 6, timeout=10)
        pings = {r.peer_id: r.next_pings for r in records}
        if b in pings.get(a, {}) or loop.time() > deadline:
            break
        await asyncio.sleep(0.5)
    assert b in pings.get(a, {}), pings
    assert 0 < pings[a][b] < 2.0
    assert pings.get(b) == {}  # the last span has no next hop


async def test_forward_chain_equals_local_model(client, swarm2, model):
    a, b = swarm2[1]
    x = torch.randn(2, 7, 64)
    remote = await client.forward(b, await client.forward(a, x, 0, 3), 3, 6)
    torch.testing.assert_close(remote, model.span(x), atol=1e-5, rtol=1e-5)
    # Part of a span: blocks 1:2 only.
    torch.testing.assert_close(await client.forward(a, x, 1, 2), model.span(x, 0, None, 1, 2))


async def test_backward_equals_autograd(client, swarm2, model):
    a, b = swarm2[1]
    x = torch.randn(2, 5, 64)
    g = torch.randn(2, 5, 64)
    h = await client.forward(a, x, 0, 3)
    grad_h = await client.backward(b, h, g, 3, 6)
    grad_x = await client.backward(a, x, grad_h, 0, 3)
    xr = x.clone().requires_grad_(True)
    model.span(xr).backward(g)
    torch.testing.assert_close(grad_x, xr.grad, atol=1e-5, rtol=1e-4)


async def test_large_forward_streams(client, swarm2, model):
    # 1 x 400 x 64 fp32 stays under the unary limit; compress nothing and send 3 MiB instead.
    a = swarm2[1][0]
    x = torch.randn(1, 500, 64)
    big = PeerClient(client.p2p)
    orig = wire.UNARY_LIMIT_BYTES
    wire.UNARY_LIMIT_BYTES = 1000  # force the streaming path, with several parts
    orig_part = wire.PART_BYTES
    wire.PART_BYTES = 16 << 10
    try:
        torch.testing.assert_close(await big.forward(a, x, 0, 3), model.span(x, 0, None, 0, 3))
        g = torch.randn_like(x)
        assert (await big.backward(a, x, g, 0, 3)).shape == x.shape
    finally:
        wire.UNARY_LIMIT_BYTES = orig
        wire.PART_BYTES = orig_part


async def test_compressed_forward_is_close(swarm2, client, model):
    a = swarm2[1][0]
    c8 = PeerClient(client.p2p, compression="int8-block64")
    x = torch.randn(2, 4, 64)
    out = await c8.forward(a, x, 0, 3)
    ref = model.span(x, 0, None, 0, 3)
    assert ((out - ref).norm() / ref.norm()).item() < 0.05


async def test_codec_per_call(swarm2, client, model):
    # One client, the codec chosen per call: compressed calls are close but not exact.
    a = swarm2[1][0]
    x = torch.randn(2, 4, 64)
    ref = model.span(x, 0, None, 0, 3)

    def rel(out):
        return ((out - ref).norm() / ref.norm()).item()

    assert rel(await client.forward(a, x, 0, 3)) < 1e-5
    assert 1e-5 < rel(await client.forward(a, x, 0, 3, codec="int8-block64")) < 0.05
    g = torch.randn_like(x)
    exact = await client.backward(a, x, g, 0, 3)
    grad = await client.backward(a, x, g, 0, 3, codec="int8-block64")
    assert 1e-5 < ((grad - exact).norm() / exact.norm()).item() < 0.05
    async with await client.open_inference(a, 0, 3, 8, batch_size=2, codec="bf16") as s:
        assert s.codec == "bf16"
        assert 1e-5 < rel(await s.step(x, 0)) < 0.05


async def test_inference_session_with_replay(client, swarm2, model):
    a, b = swarm2[1]
    sa = await client.open_inference(a, 0, 3, max_length=12, batch_size=2)
    sb = await client.open_inference(b, 3, 6, max_length=12, batch_size=2)
    caches = model.span.new_caches(2, 12)
    prefill = torch.randn(2, 4, 64)
    out = await sb.step(await sa.step(prefill, 0), 0)
    torch.testing.assert_close(out, model.span(prefill, 0, caches), atol=1e-5, rtol=1e-4)
    steps = [torch.randn(2, 1, 64) for _ in range(3)]
    for i, x in enumerate(steps):
        out = await sb.step(await sa.step(x, 4 + i), 4 + i)
        torch.testing.assert_close(out, model.span(x, 4 + i, caches), atol=1e-5, rtol=1e-4)
    # Replay from position 5 (as a client does after losing a peer): same results.
    again = await sa.step(torch.cat(steps[1:], dim=1), 5)
    assert sa.length == 7
    out = await sb.step(again, 5)
    torch.testing.assert_close(out[:, -1:], model.span(steps[2], 6, caches), atol=1e-5, rtol=1e-4)
    await sa.close()
    await sb.close()
    info = await client.info(a)
    assert info.cache_tokens_left == 256  # closed sessions return their cache


async def test_cache_full_is_immediate(client, swarm2):
    a = swarm2[1][0]
    # 180 of 256: one client may hold past its share (64) while a share stays free for others
    held = await client.open_inference(a, 0, 3, max_length=180, batch_size=1)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(CacheFull, match="cache full"):
        await client.open_inference(a, 0, 3, max_length=100, batch_size=1)
    assert loop.time() - t0 < 5
    await held.close()
    again = await client.open_inference(a, 0, 3, max_length=100, batch_size=1)
    await again.close()


async def test_session_freed_when_client_vanishes(client, swarm2):
    a = swarm2[1][0]
    s = await client.open_inference(a, 0, 3, max_length=100, batch_size=1)
    await s._shutdown()  # drop the stream without a close message
    wait_left = 0
    for _ in range(50):
        wait_left = (await client.info(a)).cache_tokens_left
        if wait_left == 256:
            break
        await asyncio.sleep(0.1)
    assert wait_left == 256


# ---- bad input: a clear error each time, and the peer keeps serving ------------------------


async def _raw_forward(client: PeerClient, peer: str, hidden_msg) -> peer_pb2.ForwardResponse:
    stub = PeerHandler.get_stub(client.p2p, as_peer_id(peer))
    request = peer_pb2.ForwardRequest(hidden=hidden_msg, first=0, last=3)
    return await stub.rpc_forward(request, timeout=30)


async def test_bad_hidden_size(client, swarm2):
    a = swarm2[1][0]
    with pytest.raises(BadRequest, match="hidden size 32"):
        await client.forward(a, torch.randn(1, 3, 32), 0, 3)
    await _still_serving(client, a)


async def test_bad_dtype(client, swarm2):
    a = swarm2[1][0]
    msg = wire.encode(torch.randn(1, 3, 64), "none")
    msg.dtype = "int64"
    reply = await _raw_forward(client, a, msg)
    assert reply.error.kind == "BadRequest" and "hidden" in reply.error.message
    await _still_serving(client, a)


async def test_tensor_larger_than_declared(client, swarm2):
    a = swarm2[1][0]
    msg = wire.encode(torch.randn(1, 3, 64), "none")
    msg.codes = msg.codes + bytes(64 * 4)
    reply = await _raw_forward(client, a, msg)
    assert reply.error.kind == "BadRequest"
    await _still_serving(client, a)


async def test_tensor_larger_than_allowed(client, swarm2):
    a = swarm2[1][0]
    with pytest.raises(BadRequest, match="more than this peer allows"):
        await client.forward(a, torch.randn(1, 600, 64), 0, 3)
    await _still_serving(client, a)


async def test_sequence_longer_than_session_maximum(client, swarm2):
    a = swarm2[1][0]
    s = await client.open_inference(a, 0, 3, max_length=4, batch_size=1)
    await s.step(torch.randn(1, 3, 64), 0)
    with pytest.raises(BadRequest, match="max_length 4"):
        await s.step(torch.randn(1, 2, 64), 3)
    assert s.closed
    await _still_serving(client, a)


async def test_unknown_session(client, swarm2):
    a = swarm2[1][0]
    s = await client.open_inference(a, 0, 3, max_length=4, batch_size=1)
    s.session_id = "no-such-session"
    with pytest.raises(SessionExpired, match="unknown session"):
        await s.step(torch.randn(1, 1, 64), 0)
    await _still_serving(client, a)


async def test_malformed_protobuf_bytes(client, swarm2):
    a = swarm2[1][0]
    stub = PeerHandler.get_stub(client.p2p, as_peer_id(a))
    done = asyncio.Event()

    async def parts():
        yield peer_pb2.Part(data=b"\x0a\xff\xff\xff\x0f", index=0, count=1)
        await done.wait()

    responses = await stub.rpc_forward_stream(parts())
    reply = await asyncio.wait_for(wire.join(responses, peer_pb2.ForwardResponse), 30)
    done.set()
    assert reply.error.kind == "BadRequest" and "malformed" in reply.error.message
    # The unary path: hivemind fails to parse and reports it; the peer lives on.
    with pytest.raises(hivemind.p2p.P2PHandlerError, match="DecodeError"):
        await asyncio.wait_for(
            client.p2p._client.call_unary_handler(
                as_peer_id(a), "PeerHandler.rpc_forward", b"\x0a\xff\xff\xff\x0f"
            ),
            30,
        )
    await _still_serving(client, a)


async def test_nan(client, swarm2):
    a = swarm2[1][0]
    x = torch.randn(1, 3, 64)
    x[0, 1, 5] = float("nan")
    with pytest.raises(BadRequest, match="NaN"):
        await client.forward(a, x, 0, 3)
    await _still_serving(client, a)


async def test_blocks_outside_span(client, swarm2):
    a = swarm2[1][0]
    with pytest.raises(BadRequest, match="not inside"):
        await client.forward(a, torch.randn(1, 3, 64), 2, 5)
    await _still_serving(client, a)


async def test_link_delay_is_paid_by_what_each_side_sends(client, swarm2):
    _, (a, b) = swarm2
    slow = PeerClient(client.p2p, link=Link(0.05))
    t0 = time.perf_counter()
    await client.info(b)
    replies = time.perf_counter() - t0
    t0 = time.perf_counter()
    await slow.info(b)
    both = time.perf_counter() - t0
    stream = await slow.open_inference(b, 3, 6, 8)
    t0 = time.perf_counter()
    await stream.step(torch.randn(1, 1, 64), 0)
    step = time.perf_counter() - t0
    await stream.close()
    # Lower bounds only: the link adds at least its delay; the machine may add more.
    assert replies >= PEER_LINK_DELAY
    assert both >= 0.05 + PEER_LINK_DELAY and step >= 0.05 + PEER_LINK_DELAY
