"""The direct channel (swarm.peer.direct) on real TCP sockets on 127.0.0.1: streams round-trip for
a ticket's holder (who the handler sees as the ticket's client), bad hellos are refused without a
byte, tampered, replayed and oversized records drop the connection, nothing goes in the clear,
and the server serves on. The scenario with peer processes is in tests/client/test_scenario_push.
"""

from __future__ import annotations

import asyncio
import gc
import os

import pytest
from hivemind.p2p import PeerID

from proto import peer_pb2
from swarm.peer import direct, streams

MIB = 1 << 20
ALICE, BOB = PeerID(b"alice-peer-id"), PeerID(b"bob-peer-id")


async def _aiter(items):
    for item in items:
        yield item


class EchoServer:
    """A DirectServer whose one handler, "echo", answers every part and notes who called."""

    def __init__(self):
        self.callers: list = []

        async def echo(requests, context):
            self.callers.append(context.remote_id)
            async for part in requests:
                yield part

        handle = streams.stream_server("echo", echo, peer_pb2.Part, 4 * MIB, PeerID(b"server"))
        self.server = direct.DirectServer({"echo": handle})

    async def __aenter__(self) -> EchoServer:
        await self.server.start("127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.server.close()

    async def echo(self, ticket, parts, wait: bool = True) -> list:
        reader, writer = await direct.connect("127.0.0.1", ticket, "echo", wait=wait)
        replies = streams.stream_over(
            reader, writer, "echo", PeerID(b"server"), _aiter(parts), peer_pb2.Part, 4 * MIB
        )
        return [r async for r in replies]


def _hello(ticket, nonce: bytes, name: bytes = b"echo", magic: bytes = direct.MAGIC) -> bytes:
    return magic + ticket.ticket_id + nonce + bytes([len(name)]) + name


async def _raw(port: int, data: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    return reader, writer


async def _closed_without_a_byte(reader: asyncio.StreamReader) -> bool:
    async with asyncio.timeout(5):
        return await reader.read(1) == b""


@pytest.mark.timeout(60)
async def test_direct_stream_round_trips_for_the_tickets_holder():
    async with EchoServer() as s:
        ticket = s.server.ticket(ALICE)
        assert ticket.port == s.server.port and len(ticket.secret) == direct.SECRET_BYTES
        # 2.5 MiB crosses in three records; the small parts in one each.
        parts = [peer_pb2.Part(data=os.urandom(n), index=0, count=1) for n in (10, 5 * MIB // 2, 1)]
        assert await s.echo(ticket, parts) == parts
        assert await s.echo(ticket, parts[:1]) == parts[:1]  # a ticket opens many connections
        assert s.callers == [ALICE, ALICE]  # the handler sees the ticket's client
        assert await s.echo(s.server.ticket(BOB), parts[:1]) == parts[:1]
        assert s.callers[-1] == BOB


@pytest.mark.timeout(60)
async def test_direct_channel_refuses_bad_hellos_without_a_byte():
    async with EchoServer() as s:
        ticket = s.server.ticket(ALICE)
        forged = peer_pb2.DirectTicket(ticket_id=os.urandom(16), secret=ticket.secret)
        nonce = os.urandom(direct.NONCE_BYTES)
        refused = {
            "unknown ticket": _hello(forged, nonce),
            "wrong magic": _hello(ticket, os.urandom(16), magic=b"HTTP"),
            "unknown handler": _hello(ticket, os.urandom(16), name=b"rpc_forward"),
        }
        for what, hello in refused.items():
            reader, writer = await _raw(s.server.port, hello)
            assert await _closed_without_a_byte(reader), what
            writer.close()
        # A nonce opens one connection: the same hello again (a replay) is refused.
        reader, writer = await _raw(s.server.port, _hello(ticket, nonce))
        assert await reader.readexactly(4 + 2 + direct.TAG_BYTES)  # the sealed "ok"
        replay_reader, replay_writer = await _raw(s.server.port, _hello(ticket, nonce))
        assert await _closed_without_a_byte(replay_reader)
        writer.close(), replay_writer.close()
        # An expired ticket, and a client's oldest ticket once it asked for too many.
        s.server._tickets[ticket.ticket_id].expires = 0.0
        with pytest.raises(direct.ChannelRefused):
            await direct.connect("127.0.0.1", ticket, "echo")
        tickets = [s.server.ticket(BOB) for _ in range(direct.TICKETS_PER_CLIENT + 1)]
        with pytest.raises(direct.ChannelRefused):
            await direct.connect("127.0.0.1", tickets[0], "echo")
        parts = [peer_pb2.Part(data=b"still serving", index=0, count=1)]
        assert await s.echo(tickets[-1], parts) == parts
        # A connection that never says its hello is closed after HELLO_TIMEOUT.
        reader, writer = await asyncio.open_connection("127.0.0.1", s.server.port)
        async with asyncio.timeout(direct.HELLO_TIMEOUT + 5):
            assert await reader.read(1) == b""
        writer.close()


@pytest.mark.timeout(60)
async def test_tampered_replayed_or_oversized_records_drop_the_connection():
    async with EchoServer() as s:
        ticket = s.server.ticket(ALICE)
        frame = streams.frame(peer_pb2.Part(data=b"x" * 64, index=0, count=1))

        async def opened() -> tuple[asyncio.StreamReader, asyncio.StreamWriter, direct.AESGCM]:
            nonce = os.urandom(direct.NONCE_BYTES)
            reader, writer = await _raw(s.server.port, _hello(ticket, nonce))
            await reader.readexactly(4 + 2 + direct.TAG_BYTES)
            c2s, _ = direct._keys(ticket.secret, nonce)
            return reader, writer, c2s

        def record(aead, number: int, data: bytes) -> bytes:
            sealed = aead.encrypt(number.to_bytes(12, "big"), data, None)
            return len(sealed).to_bytes(4, "big") + sealed

        # Control: a well-sealed record is answered.
        reader, writer, c2s = await opened()
        writer.write(record(c2s, 0, frame))
        assert await reader.readexactly(4)
        writer.close()

        # One flipped bit; a record sent again (its number is then the wrong one); a length
        # of 4 GiB (refused from the header: nothing allocated); one too short for its tag.
        def flipped(aead) -> bytes:
            data = bytearray(record(aead, 0, frame))
            data[-1] ^= 1
            return bytes(data)

        for what, bad in {
            "tampered": flipped,
            "replayed": lambda aead: record(aead, 0, frame),
            "oversized": lambda aead: (2**32 - 1).to_bytes(4, "big"),
            "too short": lambda aead: (3).to_bytes(4, "big") + b"abc",
            # A data record passed off as a control one (the header's bit is not sealed, but
            # a control record's seal covers it).
            "control bit": lambda aead: (
                bytes([record(aead, 0, frame)[0] | 0x80]) + record(aead, 0, frame)[1:]
            ),
        }.items():
            reader, writer, c2s = await opened()
            if what == "replayed":  # the first copy is answered, the second drops the connection
                writer.write(bad(c2s))
                assert await reader.readexactly(4)
            writer.write(bad(c2s))
            async with asyncio.timeout(5):
                rest = await reader.read()  # anything the server still sends, then its close
            assert rest == b"" or what == "replayed", what
            writer.close()
        parts = [peer_pb2.Part(data=b"still serving", index=0, count=1)]
        assert await s.echo(ticket, parts) == parts


async def test_sealed_records_hide_and_guard_what_they_carry():
    secret, nonce = os.urandom(32), os.urandom(16)
    c2s, _ = direct._keys(secret, nonce)
    wire = bytearray()

    class Capture:
        def write(self, data):
            wire.extend(data)

    writer = direct.SealedWriter(Capture(), c2s)
    plain = b"the hidden states of a private prompt " * 100
    writer.write(plain)
    writer.write(b"second")
    assert plain[:32] not in wire and len(wire) == len(plain) + 6 + 2 * (4 + direct.TAG_BYTES)

    def raw_of(data: bytes) -> asyncio.StreamReader:
        raw = asyncio.StreamReader()
        raw.feed_data(data)
        raw.feed_eof()
        return raw

    def reader_of(data: bytes) -> direct.SealedReader:
        return direct.SealedReader(raw_of(data), c2s)

    r = reader_of(bytes(wire))
    assert await r.readexactly(len(plain) + 6) == plain + b"second"
    with pytest.raises(asyncio.IncompleteReadError):
        await r.readexactly(1)
    # The other direction's key, or a cut record, is refused.
    _, s2c = direct._keys(secret, nonce)
    with pytest.raises(direct.ChannelBroken, match="authentication"):
        await direct.SealedReader(raw_of(bytes(wire)), s2c).readexactly(1)
    with pytest.raises(direct.ChannelBroken, match="inside a record"):
        await reader_of(bytes(wire[:20])).readexactly(1)


@pytest.mark.timeout(60)
async def test_connections_yet_to_say_hello_are_bounded(monkeypatch):
    monkeypatch.setattr(direct, "MAX_PENDING", 2)
    async with EchoServer() as s:
        ticket = s.server.ticket(ALICE)
        silent = [await asyncio.open_connection("127.0.0.1", s.server.port) for _ in range(2)]
        await asyncio.sleep(0.2)  # both are being served, waiting for a hello
        with pytest.raises(direct.ChannelRefused):  # a third: closed
            await direct.connect("127.0.0.1", ticket, "echo")
        for _, writer in silent:
            writer.close()
        await asyncio.sleep(0.2)
        parts = [peer_pb2.Part(data=b"served again", index=0, count=1)]
        assert await s.echo(ticket, parts) == parts


@pytest.mark.timeout(30)
async def test_closing_the_server_mid_stream_leaves_no_unretrieved_error():
    """A peer's shutdown cancels its open streams. The read each one had in flight was left
    behind, failed when the connection went, and asyncio logged "Task exception was never
    retrieved" with a traceback (seen on SIGTERM with a push stream open)."""
    loop = asyncio.get_running_loop()
    logged: list = []
    loop.set_exception_handler(lambda _, context: logged.append(context["message"]))
    try:
        async with EchoServer() as s:
            reader, writer = await direct.connect("127.0.0.1", s.server.ticket(ALICE), "echo")
            part = peer_pb2.Part(data=b"x", index=0, count=1)
            await streams.send(part, writer)
            assert await streams.receive(reader, peer_pb2.Part, MIB) == part  # the stream is open
        writer.close()  # after the server's close: its read fails, unawaited
        await asyncio.sleep(0.1)
        gc.collect()
        assert not [m for m in logged if "never retrieved" in m], logged
    finally:
        loop.set_exception_handler(None)


@pytest.mark.timeout(60)
async def test_without_waiting_for_the_hellos_answer_a_refusal_comes_at_the_first_read():
    """connect(wait=False) returns before the peer answered (the first message follows the
    hello at once, saving a round trip): an accepted stream round-trips as before, and a
    refused one raises ChannelRefused at its first read, with nothing served."""
    async with EchoServer() as s:
        ticket = s.server.ticket(ALICE)
        parts = [peer_pb2.Part(data=os.urandom(n), index=0, count=1) for n in (10, 3 * MIB // 2)]
        assert await s.echo(ticket, parts, wait=False) == parts
        forged = peer_pb2.DirectTicket()
        forged.CopyFrom(ticket)
        forged.ticket_id = os.urandom(direct.ID_BYTES)
        with pytest.raises(direct.ChannelRefused):
            await s.echo(forged, parts, wait=False)
        with pytest.raises(direct.ChannelRefused):  # a refused hello and no message at all
            reader, _ = await direct.connect("127.0.0.1", forged, "echo", wait=False)
            await reader.readexactly(1)
        assert s.callers == [ALICE]  # only the accepted stream reached the handler
        assert await s.echo(ticket, parts[:1]) == parts[:1]  # and the server serves on


@pytest.mark.timeout(60)
async def test_an_emulated_link_delays_the_tcp_handshake():
    """With --link-delay, opening a direct stream pays the TCP handshake's round trip, as a
    WAN would; a libp2p stream on a connection already open pays none (its protocol is
    negotiated optimistically)."""
    from swarm.link import Link

    async with EchoServer() as s:
        ticket = s.server.ticket(ALICE)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        reader, writer = await direct.connect(
            "127.0.0.1", ticket, "echo", wait=False, link=Link(0.05)
        )
        assert 0.1 <= loop.time() - t0 < 1.0
        writer.close()


async def _echo_on(reader, writer, parts) -> list:
    replies = streams.stream_over(
        reader, writer, "echo", PeerID(b"server"), _aiter(parts), peer_pb2.Part, 4 * MIB
    )
    return [r async for r in replies]


@pytest.mark.timeout(60)
async def test_a_connection_carries_streams_one_after_another():
    """A stream that ended cleanly both ways gives its connection back (on_idle), and the next
    stream goes on it (NEXT record): no TCP handshake, the same keys, numbers going on."""
    async with EchoServer() as s:
        ticket = s.server.ticket(ALICE)
        idle: list = []
        parts = [peer_pb2.Part(data=os.urandom(n), index=0, count=1) for n in (10, 3 * MIB // 2)]
        reader, writer = await direct.connect(
            "127.0.0.1", ticket, "echo", wait=False, on_idle=idle.append
        )
        assert await _echo_on(reader, writer, parts) == parts
        assert idle == [writer.connection] and not writer.connection.closed
        for _ in range(2):
            reader, writer = idle.pop().next_stream("echo")
            assert await _echo_on(reader, writer, parts[:1]) == parts[:1]
        assert idle == [writer.connection] and writer.connection.streams == 3
        assert s.server.streams_served == 2 and s.callers == [ALICE] * 3
        writer.connection.close()


@pytest.mark.timeout(60)
async def test_a_stream_cut_short_closes_its_connection_and_an_idle_one_goes_stale(monkeypatch):
    async with EchoServer() as s:
        ticket = s.server.ticket(ALICE)
        idle: list = []
        part = peer_pb2.Part(data=b"x", index=0, count=1)
        # Cut short: the client closes before the peer ended the stream. Not reused.
        reader, writer = await direct.connect("127.0.0.1", ticket, "echo", on_idle=idle.append)
        await streams.send(part, writer)
        assert await streams.receive(reader, peer_pb2.Part, MIB) == part
        writer.close()
        assert idle == [] and writer.connection.closed
        # An idle connection the peer closed meanwhile: the next stream's first read says so.
        monkeypatch.setattr(direct, "IDLE_TIMEOUT", 0.2)
        reader, writer = await direct.connect("127.0.0.1", ticket, "echo", on_idle=idle.append)
        assert await _echo_on(reader, writer, [part]) == [part]
        await asyncio.sleep(0.6)
        with pytest.raises(direct.ChannelStale):
            reader, writer = idle.pop().next_stream("echo")
            await _echo_on(reader, writer, [part])
        assert await s.echo(ticket, [part]) == [part]  # the server serves on
