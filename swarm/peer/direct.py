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

MAGIC = b"SWD1"
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

# A stream handler as hivemind's binary ones: (info with .peer_id, reader, writer).
Handle = Callable[[object, object, object], Awaitable[None]]


class ChannelBroken(ConnectionError):
    """A record that fails authentication or is malformed: the connection is dropped."""


class ChannelRefused(ChannelBroken):
    """The peer closed the connection before it accepted the hello: nothing was served."""


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


class SealedWriter:
    """An asyncio.StreamWriter's interface over AES-GCM records: each write seals its bytes."""

    def __init__(self, writer: asyncio.StreamWriter, aead: AESGCM):
        self._w, self._aead, self._count = writer, aead, 0

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        for i in range(0, max(len(view), 1), MAX_RECORD):
            nonce = self._count.to_bytes(12, "big")
            self._count += 1
            sealed = self._aead.encrypt(nonce, bytes(view[i : i + MAX_RECORD]), None)
            self._w.write(len(sealed).to_bytes(4, "big") + sealed)

    async def drain(self) -> None:
        await self._w.drain()

    def close(self) -> None:
        self._w.close()

    def is_closing(self) -> bool:
        return self._w.is_closing()

    async def wait_closed(self) -> None:
        await self._w.wait_closed()

    def get_extra_info(self, name: str, default=None):
        return self._w.get_extra_info(name, default)


class SealedReader:
    """An asyncio.StreamReader's interface (readexactly, read) over AES-GCM records."""

    def __init__(self, reader: asyncio.StreamReader, aead: AESGCM, accepted: bool = True):
        self._r, self._aead, self._count = reader, aead, 0
        self._buf = bytearray()
        self._eof = False
        self._accepted = accepted  # False: the first record must be the hello's answer

    async def _record(self) -> bool:
        """Read and open one record into the buffer; False at the end of the connection."""
        try:
            header = await self._r.readexactly(4)
        except asyncio.IncompleteReadError as e:
            if e.partial:
                raise ChannelBroken("the direct channel ended inside a record") from None
            if not self._accepted:
                raise ChannelRefused("the peer's direct channel refused the hello") from None
            self._eof = True
            return False
        except ConnectionResetError:  # a refused hello whose first message was left unread
            if not self._accepted:
                raise ChannelRefused("the peer's direct channel refused the hello") from None
            raise
        length = int.from_bytes(header, "big")
        if not TAG_BYTES <= length <= MAX_RECORD + TAG_BYTES:
            raise ChannelBroken(f"a direct-channel record of {length} bytes (limit {MAX_RECORD})")
        try:
            sealed = await self._r.readexactly(length)
        except asyncio.IncompleteReadError:
            raise ChannelBroken("the direct channel ended inside a record") from None
        nonce = self._count.to_bytes(12, "big")
        self._count += 1
        try:
            plain = self._aead.decrypt(nonce, sealed, None)
        except InvalidTag:
            raise ChannelBroken("a direct-channel record failed authentication") from None
        if not self._accepted:
            if plain != _OK:
                raise ChannelBroken("the peer's direct channel did not accept the hello")
            self._accepted = True
            return True
        self._buf += plain
        return True

    async def readexactly(self, n: int) -> bytes:
        while len(self._buf) < n:
            if self._eof or not await self._record():
                partial = bytes(self._buf)
                self._buf.clear()
                raise asyncio.IncompleteReadError(partial, n)
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    async def accepted(self) -> None:
        """Return once the hello's answer came; raise ChannelRefused if the peer refused it."""
        while not self._accepted:
            if not await self._record():
                raise ChannelRefused("the peer's direct channel refused the hello")

    async def read(self, n: int = -1) -> bytes:
        while not self._buf and not self._eof:
            await self._record()
        n = len(self._buf) if n < 0 else min(n, len(self._buf))
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data


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
            sealed_writer = SealedWriter(writer, s2c)
            sealed_writer.write(_OK)
            info = types.SimpleNamespace(peer_id=ticket.client)
            await self.handlers[name](info, SealedReader(reader, c2s), sealed_writer)
        except ChannelBroken as e:
            logger.debug("direct channel dropped a connection: %s", e)
        finally:
            self._connections.discard(task)
            writer.close()

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
) -> tuple[SealedReader, SealedWriter]:
    """Open a direct-channel stream to handler `name`, or raise (ConnectionError, TimeoutError,
    ChannelBroken). wait: return once the peer answered the hello; else at once, and a refusal
    raises ChannelRefused at the first read. link: an emulated link (--link-delay) also delays
    the TCP handshake, a round trip the kernel makes."""
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
            sealed_reader = SealedReader(reader, s2c, accepted=False)
            if wait:
                await sealed_reader.accepted()
        except BaseException:
            writer.close()
            raise
    return sealed_reader, SealedWriter(writer, c2s)
