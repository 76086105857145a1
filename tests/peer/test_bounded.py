"""Bounded requests: a peer refuses what passes its size limits from the first header, unread.

Tests swarm/peer/streams.py, wire.join's limits, memory.ByteBudget and their use in
swarm/peer/handler.py, against a real peer process written to by raw hivemind P2P calls.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest
import torch
from hivemind.p2p import P2P

from proto import peer_pb2
from swarm.peer import streams, wire
from swarm.peer.client import PeerClient, as_peer_id
from swarm.peer.handler import PeerHandler
from swarm.peer.memory import ByteBudget, PeerBusy
from tests.conftest import PeerProcess

MIB = 1 << 20
GIB = 1 << 30
HIDDEN = 64  # the tiny model's
REQUEST_MEMORY_MB = 2  # the peer holds one request of its largest kind, never two


# ---- wire.join's limits, without a network ------------------------------------------------


async def _aiter(items):
    for item in items:
        yield item


async def test_join_refuses_from_the_first_part_and_reserves_what_it_may_hold():
    seen = []

    async def first_only():
        yield peer_pb2.Part(data=bytes(wire.PART_BYTES), index=0, count=1024)
        seen.append("read past the first part")

    with pytest.raises(wire.RequestTooLarge, match="declares 1024 parts"):
        await wire.join(first_only(), peer_pb2.ForwardRequest, max_bytes=8 * MIB)
    assert seen == []
    # A part longer than a part may be is refused as it comes.
    big = [peer_pb2.Part(data=bytes(wire.PART_BYTES + 1), index=0, count=2)]
    with pytest.raises(wire.RequestTooLarge, match="limits of a part"):
        await wire.join(_aiter(big), peer_pb2.ForwardRequest, max_bytes=8 * MIB)
    # A legitimate message of 1.5 parts fits a limit of 1.6 parts, and reserves at most that.
    reserved = []
    request = peer_pb2.ForwardRequest(hidden=wire.encode(torch.randn(1, 6144, HIDDEN), "none"))
    parts = wire.split(request)
    assert len(parts) == 2
    msg = await wire.join(_aiter(parts), peer_pb2.ForwardRequest, int(1.6 * MIB), reserved.append)
    assert msg == request and reserved == [int(1.6 * MIB)]


def test_byte_budget_refuses_as_busy_and_frees():
    budget = ByteBudget(10, per_client=6)
    budget.reserve(6, "a")
    with pytest.raises(PeerBusy, match="one client may hold 6"):
        budget.reserve(1, "a")
    with pytest.raises(PeerBusy, match="peer busy: a request of 5 bytes"):
        budget.reserve(5, "b")
    budget.reserve(4, "b")
    budget.release(6, "a")
    budget.release(4, "b")
    assert budget.used == 0 and budget.reserve(6, "c") == 6


# ---- a real peer --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bounded_peer(tiny_model_dir, tmp_path_factory, throughput_cache):
    """Blocks 0:3, fp32, 512-token requests, no adapters: its largest request is 1.25 MiB."""
    logs = tmp_path_factory.mktemp("bounded_logs")
    env = {"SWARM_MESH_CACHE": str(throughput_cache.parent)}
    args = ["join", "--model", str(tiny_model_dir), "--stage", "0:3", "--quant", "none"]
    args += ["--max-request-tokens", "512", "--max-adapters", "0", "--announce-period", "2"]
    args += ["--request-memory-mb", str(REQUEST_MEMORY_MB)]
    peer = PeerProcess(args, env, logs / "peer.log")
    try:
        peer.wait_maddrs(90)
        peer.wait_log("serving blocks", 120)
        yield peer
    finally:
        peer.kill()


def _status_kb(pid: int) -> dict[str, int]:
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                fields[key] = int(value.split()[0])
    return fields


def _client_run(peer: PeerProcess, fn):
    """Run `fn(p2p)` with a fresh P2P identity joined to `peer` (loopback only)."""

    async def main():
        p2p = await P2P.create(initial_peers=peer.maddrs, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        try:
            return await fn(p2p)
        finally:
            await p2p.shutdown()

    return asyncio.run(main())


async def _still_serving(p2p: P2P, peer: PeerProcess) -> None:
    x = torch.randn(1, 4, HIDDEN)
    out = await PeerClient(p2p).forward(peer.peer_id, x, 0, 3, timeout=30)
    assert out.shape == x.shape


async def _gib_in_parts(p2p: P2P, peer_id) -> tuple[peer_pb2.ForwardResponse | None, int]:
    """A 1 GiB forward as 1024 parts of 1 MiB, made lazily (the test holds one part)."""
    stub = PeerHandler.get_stub(p2p, peer_id)
    chunk = bytes(wire.PART_BYTES)
    sent = 0

    async def parts():
        nonlocal sent
        for i in range(GIB // wire.PART_BYTES):
            yield peer_pb2.Part(data=chunk, index=i, count=GIB // wire.PART_BYTES)
            sent += 1

    responses = await stub.rpc_forward_stream(parts())
    try:
        reply = await asyncio.wait_for(wire.join(responses, peer_pb2.ForwardResponse), 30)
    finally:
        with contextlib.suppress(Exception):
            await responses.aclose()
    return reply, sent


async def _gib_in_one_message(p2p: P2P, peer_id) -> tuple[peer_pb2.ForwardResponse, int]:
    """One Part message whose length prefix says 1 GiB, its bytes written lazily after it."""
    _, reader, writer = await p2p.call_binary_stream_handler(
        peer_id, "PeerHandler.rpc_forward_stream"
    )
    written = 0

    async def write():
        nonlocal written
        writer.write(P2P.MESSAGE_MARKER + GIB.to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER))
        chunk = bytes(MIB)
        for _ in range(GIB // MIB):
            writer.write(chunk)
            await writer.drain()
            written += MIB

    writing = asyncio.create_task(write())
    try:
        part, err = await asyncio.wait_for(P2P.receive_protobuf(peer_pb2.Part, reader), 30)
        assert err is None
        return wire.parse(part.data, peer_pb2.ForwardResponse), written
    finally:
        writing.cancel()
        with contextlib.suppress(BaseException):
            await writing
        writer.close()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_scenario_gib_requests_are_refused_unread(bounded_peer):
    pid = bounded_peer.pid

    async def go(p2p: P2P):
        peer_id = as_peer_id(bounded_peer.peer_id)
        await _still_serving(p2p, bounded_peer)  # warm: the first forward allocates
        before = _status_kb(pid)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        reply, sent = await _gib_in_parts(p2p, peer_id)
        t_parts = loop.time() - t0
        assert reply is not None and reply.error.kind == "BadRequest", reply
        assert "declares 1024 parts" in reply.error.message
        t0 = loop.time()
        reply, written = await _gib_in_one_message(p2p, peer_id)
        t_one = loop.time() - t0
        assert reply.error.kind == "BadRequest" and "exceeds this peer's limit" in (
            reply.error.message
        )
        after = _status_kb(pid)
        await _still_serving(p2p, bounded_peer)
        return before, after, t_parts, sent, t_one, written

    before, after, t_parts, sent, t_one, written = _client_run(bounded_peer, go)
    print(
        f"\npeer RSS {before['VmRSS'] / 1024:.0f} -> {after['VmRSS'] / 1024:.0f} MB, peak "
        f"{before['VmHWM'] / 1024:.0f} -> {after['VmHWM'] / 1024:.0f} MB; 1 GiB in parts "
        f"refused in {t_parts:.2f} s ({sent} of 1024 parts left the client), in one message "
        f"in {t_one:.2f} s ({written / MIB:.0f} MiB written to the stream)"
    )
    assert after["VmHWM"] - before["VmHWM"] < 300 * 1024
    assert after["VmRSS"] - before["VmRSS"] < 100 * 1024
    assert t_parts < 10 and t_one < 10


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_scenario_requests_in_flight_cannot_add_up(bounded_peer):
    """Requests that each fit but together pass --request-memory-mb (or a client's half of it)
    are refused as busy from their first part; freed bytes serve the next request."""
    peer_id = as_peer_id(bounded_peer.peer_id)

    async def open_holding(p2p: P2P):
        """The first of two parts: the peer holds up to its largest forward for the request."""
        go_on, done = asyncio.Event(), asyncio.Event()

        async def parts():
            yield peer_pb2.Part(data=bytes(wire.PART_BYTES), index=0, count=2)
            await go_on.wait()
            yield peer_pb2.Part(data=b"\xff", index=1, count=2)  # garbage: a clear error
            await done.wait()

        responses = await PeerHandler.get_stub(p2p, peer_id).rpc_forward_stream(parts())
        await asyncio.sleep(0.5)  # its first part is read and held
        return responses, go_on, done

    async def reply_of(held) -> peer_pb2.Error:
        responses, go_on, done = held
        go_on.set()
        try:
            return (
                await asyncio.wait_for(wire.join(responses, peer_pb2.ForwardResponse), 30)
            ).error
        finally:
            done.set()
            with contextlib.suppress(Exception):
                await responses.aclose()

    async def go(a: P2P):
        b = await P2P.create(
            initial_peers=bounded_peer.maddrs, host_maddrs=["/ip4/127.0.0.1/tcp/0"]
        )
        try:
            first = await open_holding(a)
            mine = await reply_of(await open_holding(a))  # a's second: past a client's half
            theirs = await reply_of(await open_holding(b))  # b's first: past the whole budget
            freed = await reply_of(first)  # completes (as a malformed request), frees its bytes
            after = await reply_of(await open_holding(b))
            await _still_serving(b, bounded_peer)
            return mine, theirs, freed, after
        finally:
            await b.shutdown()

    mine, theirs, freed, after = _client_run(bounded_peer, go)
    assert mine.kind == "PeerUnavailable" and "one client may hold" in mine.message
    assert theirs.kind == "PeerUnavailable" and "bytes of requests this peer holds" in (
        theirs.message
    )
    assert freed.kind == "BadRequest" and "malformed" in freed.message
    assert after.kind == "BadRequest" and "malformed" in after.message, "bytes were not freed"


# ---- the client's inference stream (streams.call_stream), two real daemons in-process ------


@pytest.mark.timeout(60)
async def test_call_stream_round_trips_and_refuses_an_oversize_reply_unread():
    server = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    client = None
    try:
        maddrs = [str(m) for m in await server.get_visible_maddrs()]
        client = await P2P.create(initial_peers=maddrs, host_maddrs=["/ip4/127.0.0.1/tcp/0"])

        async def echo(requests, context):  # each request back, then one reply too large
            async for part in requests:
                yield part
            yield peer_pb2.Part(data=bytes(2 * MIB), index=0, count=1)

        await server.add_protobuf_handler(
            "echo", echo, peer_pb2.Part, stream_input=True, stream_output=True
        )
        sent = [peer_pb2.Part(data=bytes([i]) * 100, index=0, count=1) for i in range(3)]
        replies = await streams.call_stream(
            client, server.peer_id, "echo", _aiter(sent), peer_pb2.Part, MIB
        )
        got = []
        with pytest.raises(streams.MessageTooLarge, match="exceeds this peer's limit"):
            async for reply in replies:
                got.append(reply)
        assert got == sent
    finally:
        if client is not None:
            await client.shutdown()
        await server.shutdown()
