"""The direct channel: a peer's streams over plain TCP, next to libp2p, for clients that reach it.

Through libp2p every message crosses two p2pd daemons (ours and the peer's), each a hop over a
unix socket: on loopback that is most of a decode hop's transport. A peer that is reachable
(not behind NAT) also listens on `--direct-port`, and the same stream handlers serve there.

Keys come over libp2p. A client asks the peer for a ticket (`rpc_direct_ticket`, a unary call
on the authenticated and encrypted libp2p stream): a ticket id and a 32-byte secret, bound to
the client's peer id. A connection then opens with a hello (magic, ticket id, a fresh nonce of
the client, the stream's name). Each direction is keyed by HMAC-SHA256(secret, direction |
nonce) and carries AES-GCM records: a 4-byte length, then the sealed bytes; the GCM nonce is
the record's number in its direction. So only the ticket's holder can open a connection, each
connection has its own keys (a nonce is taken once per ticket), nothing can be read, changed,
reordered or replayed, and the handler sees the client's libp2p peer id as on libp2p. The
server's first record seals b"ok". A client does not wait for it (connect(wait=False)): its
first message follows the hello at once, so a stream costs the TCP handshake's round trip and
no more, where waiting would add a second. A refused hello is closed without a byte: the
client's first read then raises ChannelRefused, nothing was served, and the caller sends again
over libp2p (swarm.peer.client, swarm.peer.push).

A connection carries streams one after another (Connection): a stream ends with a sealed END
record each way, and the client may open the next one on it with a sealed NEXT record naming
the handler, so only a peer's first stream pays the TCP handshake. Control records set their
header's top bit and are sealed with _CONTROL_AAD, so the bit cannot be flipped unnoticed.

A client falls back to libp2p for DIRECT_RETRY_S when a peer's channel fails to open.
Used by swarm.peer.handler (serving), swarm.peer.client and swarm.peer.push (dialling).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import socket
import time
import types
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from proto import peer_pb2
from swarm.errors import BadRequest
from swarm.link import NO_LINK, Link

logger = logging.getLogger(__name__)

MAGIC = b"SWD2"
ID_BYTES, NONCE_BYTES, SECRET_BYTES = 16, 16, 32
TAG_BYTES = 16
MAX_NAME = 255
# A record carries at most this much: a stream message is written as one or more records, and
# a record's length is checked against it before anything is read.
MAX_RECORD = 1 << 20
TICKET_TTL = 600.0  # seconds a ticket opens connections
TICKET_MARGIN = 60.0  # a client renews its ticket this long before the peer would refuse it
MAX_TICKETS = 1024  # tickets a peer keeps (the oldest go first)
TICKETS_PER_CLIENT = 4  # a client asking for more loses its oldest
NONCES_PER_TICKET = 256  # connections one ticket may open (its nonces are kept: 16 B each)
HELLO_TIMEOUT = 5.0  # seconds a connection has to say its hello
# Open connections a peer serves, and of them those yet to say their hello: more are closed at
# once (each holds a file descriptor; a refused client still has libp2p).
MAX_CONNECTIONS = 256
MAX_PENDING = 32
CONNECT_TIMEOUT = 2.0  # to connect and hear the hello answered; then libp2p is tried
DIRECT_RETRY_S = 60.0  # a peer whose channel failed is reached over libp2p this long
_OK = b"ok"
# Control records (their header's top bit set; sealed with _CONTROL_AAD, so that flipping the
# bit fails authentication): a stream's END, and NEXT + a handler name on an idle connection.
CONTROL_BIT = 1 << 31
MAX_CONTROL = 1 + MAX_NAME
_CONTROL_AAD = b"control"
_END, _NEXT = b"E", b"N"
IDLE_TIMEOUT = 60.0  # seconds a peer keeps an idle connection for a next stream
DRAIN_BYTES = 1 << 20  # what a peer skips of a stream its handler stopped reading, to its END

# A stream handler as hivemind's binary ones: (info with .peer_id, reader, writer).
Handle = Callable[[object, object, object], Awaitable[None]]


class ChannelBroken(ConnectionError):
    """A record that fails authentication or is malformed: the connection is dropped."""


class ChannelRefused(ChannelBroken):
    """The peer closed the connection before it accepted the hello: nothing was served."""


class ChannelStale(ChannelRefused):
    """An idle connection opened again had been closed by the peer: nothing was served (open a
    new connection; the channel itself is fine)."""


def _keys(secret: bytes, nonce: bytes) -> tuple[AESGCM, AESGCM]:
    """(client to server, server to client) ciphers of one connection."""
    c2s = hmac.new(secret, b"c2s" + nonce, hashlib.sha256).digest()
    s2c = hmac.new(secret, b"s2c" + nonce, hashlib.sha256).digest()
    return AESGCM(c2s), AESGCM(s2c)


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Sealer:
    """One direction of a connection, outwards: records numbered across all its streams."""

    def __init__(self, writer: asyncio.StreamWriter, aead: AESGCM):
        self.w, self._aead, self._count = writer, aead, 0

    def seal(self, data: bytes, control: bool = False) -> None:
        nonce = self._count.to_bytes(12, "big")
        self._count += 1
        sealed = self._aead.encrypt(nonce, data, _CONTROL_AAD if control else None)
        header = len(sealed) | (CONTROL_BIT if control else 0)
        self.w.write(header.to_bytes(4, "big") + sealed)


class _Opener:
    """One direction of a connection, inwards: (control?, plaintext) of each record in turn."""

    def __init__(self, reader: asyncio.StreamReader, aead: AESGCM):
        self._r, self._aead, self._count = reader, aead, 0
        # A bad record came, or a read was cut between a header and its body: not reusable.
        self.broken = False

    async def record(self) -> tuple[bool, bytes] | None:
        """The next record, or None where the connection ended between records."""
        try:
            return await self._record()
        except ChannelBroken:
            self.broken = True  # the connection is dropped, whoever reads it
            raise

    async def _record(self) -> tuple[bool, bytes] | None:
        try:
            header = await self._r.readexactly(4)
        except asyncio.IncompleteReadError as e:
            if e.partial:
                raise ChannelBroken("the direct channel ended inside a record") from None
            return None
        raw = int.from_bytes(header, "big")
        control, length = bool(raw & CONTROL_BIT), raw & ~CONTROL_BIT
        limit = (MAX_CONTROL if control else MAX_RECORD) + TAG_BYTES
        if not TAG_BYTES <= length <= limit:
            raise ChannelBroken(f"a direct-channel record of {length} bytes (limit {limit})")
        try:
            sealed = await self._r.readexactly(length)
        except asyncio.IncompleteReadError:
            raise ChannelBroken("the direct channel ended inside a record") from None
        except asyncio.CancelledError:
            self.broken = True
            raise
        nonce = self._count.to_bytes(12, "big")
        self._count += 1
        try:
            plain = self._aead.decrypt(nonce, sealed, _CONTROL_AAD if control else None)
        except InvalidTag:
            raise ChannelBroken("a direct-channel record failed authentication") from None
        return control, plain


class SealedWriter:
    """An asyncio.StreamWriter's interface over AES-GCM records: each write seals its bytes.

    One stream of a connection: close() ends the stream with an END record (the connection may
    carry another one, Connection), or closes the connection when it cannot."""

    def __init__(
        self,
        writer: asyncio.StreamWriter | None,
        aead: AESGCM | None = None,
        connection: Connection | None = None,
    ):
        self.connection = connection
        self._sealer = connection.sealer if connection is not None else _Sealer(writer, aead)
        self._w = self._sealer.w
        self._closed = False

    def write(self, data: bytes) -> None:
        if self._closed:
            raise ConnectionResetError("the direct-channel stream is closed")
        view = memoryview(data)
        for i in range(0, max(len(view), 1), MAX_RECORD):
            self._sealer.seal(bytes(view[i : i + MAX_RECORD]))

    async def drain(self) -> None:
        await self._w.drain()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.connection is None:
            self._w.close()
        else:
            self.connection.stream_closed()

    def is_closing(self) -> bool:
        return self._closed or self._w.is_closing()

    async def wait_closed(self) -> None:
        if self.connection is None or self.connection.closed:
            await self._w.wait_closed()

    def get_extra_info(self, name: str, default=None):
        return self._w.get_extra_info(name, default)


class SealedReader:
    """An asyncio.StreamReader's interface (readexactly, read) over AES-GCM records: one
    stream of a connection, which ends at the other side's END record (or the connection's)."""

    def __init__(
        self,
        reader: asyncio.StreamReader | None,
        aead: AESGCM | None = None,
        accepted: bool = True,
        opener: _Opener | None = None,
        reused: bool = False,
    ):
        self._opener = opener if opener is not None else _Opener(reader, aead)
        self._buf = bytearray()
        self._eof = False
        self.ended = False  # the other side ended this stream with END (the connection lives)
        self._accepted = accepted  # False: the first record must be the hello's answer
        self._reused = reused  # a stream on a connection that carried one: may be stale
        self._seen = False  # any record of this stream came

    async def _record(self) -> bool:
        """Read and open one record into the buffer; False at the end of the stream."""
        # Until the peer's first record, it may not have taken this stream: a refused hello, or
        # an idle connection it had closed (then a reset means the same: our message was unread).
        unconfirmed = not self._accepted or (self._reused and not self._seen)
        try:
            got = await self._opener.record()
        except ConnectionResetError:
            if not unconfirmed:
                raise
            got = None
        if got is None:
            if not self._accepted:
                raise ChannelRefused("the peer's direct channel refused the hello")
            if unconfirmed:
                raise ChannelStale("the peer closed the idle direct-channel connection")
            self._eof = True
            return False
        self._seen = True
        control, plain = got
        if control:
            if plain[:1] != _END or self._eof:
                raise ChannelBroken(f"an unexpected direct-channel control record {plain[:1]!r}")
            self._eof = self.ended = True
            return False
        if not self._accepted:
            if plain != _OK:
                raise ChannelBroken("the peer's direct channel did not accept the hello")
            self._accepted = True
            return True
        self._buf += plain
        return True

    async def accepted(self) -> None:
        """Return once the hello's answer came; raise ChannelRefused if the peer refused it."""
        while not self._accepted:
            if not await self._record():
                raise ChannelRefused("the peer's direct channel refused the hello")

    async def readexactly(self, n: int) -> bytes:
        while len(self._buf) < n:
            if self._eof or not await self._record():
                partial = bytes(self._buf)
                self._buf.clear()
                raise asyncio.IncompleteReadError(partial, n)
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    async def read(self, n: int = -1) -> bytes:
        while not self._buf and not self._eof:
            await self._record()
        n = len(self._buf) if n < 0 else min(n, len(self._buf))
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    async def to_end(self, max_bytes: int) -> bool:
        """Skip what is left of the stream up to its END record: True if it came (within
        `max_bytes` of data), False if the connection ended or went on too long."""
        left = max_bytes - len(self._buf)
        self._buf.clear()
        while not self._eof:
            if not await self._record():
                break
            left -= len(self._buf)
            self._buf.clear()
            if left < 0:
                return False
        return self.ended


class Connection:
    """One TCP connection of the direct channel, which carries streams one after another: a
    stream ends with an END record each way, and the client may then open the next one with a
    NEXT record naming its handler, saving the TCP handshake (a round trip over a WAN).

    The client side gives a connection back for reuse (`on_idle`) only when both sides ended
    their stream with END; a stream cut short closes it."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        send: AESGCM,
        receive: AESGCM,
        on_idle: Callable[[Connection], None] | None = None,
        client: bool = True,
    ):
        self.sealer, self.opener = _Sealer(writer, send), _Opener(reader, receive)
        self._writer = writer
        self.on_idle, self.client = on_idle, client
        self.closed = False
        self.streams = 0  # streams opened on it
        self._reader: SealedReader | None = None  # the current stream's
        self.idle_since = 0.0

    def stream(self, accepted: bool = True) -> tuple[SealedReader, SealedWriter]:
        reused = self.streams > 0
        self.streams += 1
        self._reader = SealedReader(None, accepted=accepted, opener=self.opener, reused=reused)
        return self._reader, SealedWriter(None, connection=self)

    def next_stream(self, name: str) -> tuple[SealedReader, SealedWriter]:
        """The next stream, to handler `name` (the connection is idle); raises ConnectionError
        if it closed. Its first read raises ChannelStale if the peer had closed it meanwhile."""
        if self.closed or self._writer.is_closing():
            raise ChannelStale("the idle direct-channel connection is closed")
        self.sealer.seal(_NEXT + name.encode(), control=True)
        return self.stream()

    def stream_closed(self) -> None:
        """The current stream's writer closed: END it; reusable if the other side ended too."""
        if self.closed:
            return
        if self.opener.broken:  # a bad record came: the connection goes at once
            self.close()
            return
        reader = self._reader
        try:
            self.sealer.seal(_END, control=True)
        except Exception:
            self.close()
            return
        if not self.client:
            return  # the peer waits for the client's END, then for its NEXT (DirectServer)
        if reader is not None and reader.ended and self.on_idle is not None:
            self.idle_since = time.monotonic()
            self.on_idle(self)
        else:  # nobody to reuse it, or a stream cut short (the peer may still be sending)
            self.close()

    def close(self) -> None:
        self.closed = True
        self._writer.close()


class _Ticket:
    __slots__ = ("client", "secret", "expires", "nonces")

    def __init__(self, client: Hashable, secret: bytes, expires: float):
        self.client, self.secret, self.expires = client, secret, expires
        self.nonces: set[bytes] = set()


class DirectServer:
    """Serves stream handlers (by name) over TCP to holders of its tickets."""

    def __init__(self, handlers: dict[str, Handle]):
        self.handlers = handlers
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tickets: OrderedDict[bytes, _Ticket] = OrderedDict()
        self._connections: set[asyncio.Task] = set()
        self._pending = 0  # connections yet to say their hello
        self.streams_served = 0  # streams after a connection's first (reuse; tests)

    async def start(self, host: str, port: int = 0) -> int:
        self._server = await asyncio.start_server(self._serve, host, port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    def ticket(self, client: Hashable) -> peer_pb2.DirectTicket:
        """A new ticket for `client` (its libp2p peer id, as the libp2p handler saw it)."""
        now = time.monotonic()
        for key in [k for k, t in self._tickets.items() if t.expires <= now]:
            del self._tickets[key]
        mine = [k for k, t in self._tickets.items() if t.client == client]
        for key in mine[: max(0, len(mine) - TICKETS_PER_CLIENT + 1)]:
            del self._tickets[key]
        while len(self._tickets) >= MAX_TICKETS:
            self._tickets.popitem(last=False)
        ticket_id, secret = os.urandom(ID_BYTES), os.urandom(SECRET_BYTES)
        self._tickets[ticket_id] = _Ticket(client, secret, now + TICKET_TTL)
        return peer_pb2.DirectTicket(
            ticket_id=ticket_id, secret=secret, port=self.port, ttl=TICKET_TTL
        )

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if len(self._connections) >= MAX_CONNECTIONS or self._pending >= MAX_PENDING:
            writer.close()
            return
        self._connections.add(task)
        self._pending += 1
        try:
            _nodelay(writer)
            try:
                async with asyncio.timeout(HELLO_TIMEOUT):
                    hello = await reader.readexactly(len(MAGIC) + ID_BYTES + NONCE_BYTES + 1)
                    name = (await reader.readexactly(hello[-1])).decode("utf-8", "replace")
            except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                return
            finally:
                self._pending -= 1
            ticket_id = hello[len(MAGIC) : len(MAGIC) + ID_BYTES]
            nonce = hello[len(MAGIC) + ID_BYTES : -1]
            ticket = self._tickets.get(ticket_id)
            refusal = (
                "not a direct-channel hello"
                if hello[: len(MAGIC)] != MAGIC
                else "unknown or expired ticket"
                if ticket is None or ticket.expires <= time.monotonic()
                else "a nonce used before"
                if nonce in ticket.nonces
                else "the ticket opened all its connections"
                if len(ticket.nonces) >= NONCES_PER_TICKET
                else f"no stream handler {name!r}"
                if name not in self.handlers
                else None
            )
            if refusal is not None:
                logger.debug("direct channel refused a connection: %s", refusal)
                return
            ticket.nonces.add(nonce)
            c2s, s2c = _keys(ticket.secret, nonce)
            conn = Connection(reader, writer, s2c, c2s, client=False)
            conn.sealer.seal(_OK)
            info = types.SimpleNamespace(peer_id=ticket.client)
            while (name := await self._stream(conn, name, info)) is not None:
                self.streams_served += 1
        except (ChannelBroken, TimeoutError) as e:
            logger.debug("direct channel dropped a connection: %r", e)
        finally:
            self._connections.discard(task)
            writer.close()

    async def _stream(self, conn: Connection, name: str, info) -> str | None:
        """Serve one stream of `conn` with handler `name`; the next stream's handler name, or
        None when the connection is to close (the client went, idled, or misbehaved)."""
        reader, writer = conn.stream()
        await self.handlers[name](info, reader, writer)
        writer.close()  # our END (the handler's own close sent it already)
        if conn.closed:
            return None
        async with asyncio.timeout(HELLO_TIMEOUT):
            if not await reader.to_end(DRAIN_BYTES):
                return None
        async with asyncio.timeout(IDLE_TIMEOUT):
            got = await conn.opener.record()
        if got is None or not got[0] or got[1][:1] != _NEXT:
            return None
        name = got[1][1:].decode("utf-8", "replace")
        return name if name in self.handlers else None

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.wait(self._connections, timeout=2.0)


async def connect(
    host: str,
    ticket: peer_pb2.DirectTicket,
    name: str,
    timeout: float = CONNECT_TIMEOUT,
    wait: bool = True,
    link: Link = NO_LINK,
    on_idle: Callable[[Connection], None] | None = None,
) -> tuple[SealedReader, SealedWriter]:
    """Open a direct-channel stream to handler `name`, or raise (ConnectionError, TimeoutError,
    ChannelBroken). wait: return once the peer answered the hello; else at once, and a refusal
    raises ChannelRefused at the first read. link: an emulated link (--link-delay) also delays
    the TCP handshake, a round trip the kernel makes. on_idle: gets the connection once the
    stream ended cleanly on both sides (Connection.next_stream opens the next one); without
    it, the stream's end closes the connection."""
    raw = name.encode()
    if len(raw) > MAX_NAME:
        raise BadRequest(f"stream name {name[:32]!r}... is too long")
    nonce = os.urandom(NONCE_BYTES)
    async with asyncio.timeout(timeout):
        if link.emulated:
            await link.send(0)  # SYN
            await asyncio.sleep(link.delay)  # SYN-ACK, on the peer's link as on ours
        reader, writer = await asyncio.open_connection(host, ticket.port)
        try:
            _nodelay(writer)
            writer.write(MAGIC + ticket.ticket_id + nonce + bytes([len(raw)]) + raw)
            c2s, s2c = _keys(ticket.secret, nonce)
            conn = Connection(reader, writer, c2s, s2c, on_idle)
            sealed_reader, sealed_writer = conn.stream(accepted=False)
            if wait:
                await sealed_reader.accepted()
        except BaseException:
            writer.close()
            raise
    return sealed_reader, sealed_writer
