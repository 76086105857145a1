"""PeerClient: calls one peer's RPCs (info, forward, backward, inference) with typed errors.

Used by the petals_like client (routing, failover), the SWARM trainer, status tools and benchmarks.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

import torch
from hivemind.p2p import P2P, P2PDaemonError, P2PHandlerError, PeerID

from proto import peer_pb2, tensor_pb2
from swarm.errors import AdapterMissing, BadRequest, PeerTimeout, PeerUnavailable, SwarmError
from swarm.link import NO_LINK, Link
from swarm.loops import quiet, within
from swarm.model.lora import AdapterPayload, BlockTensors
from swarm.peer import direct, streams, wire
from swarm.peer.handler import PART_MESSAGE_BYTES, PeerHandler
from swarm.peer.relay import dial_maddr, is_circuit

logger = logging.getLogger(__name__)

T = TypeVar("T")
SENT_MEMORY = 4096  # (peer, adapter hash) pairs we remember having sent
DIAL_TIMEOUT = 5.0  # seconds to reach a peer at its announced addrs (through relays if relayed)
MAX_DIAL_ADDRS = 8  # most announced addrs tried per peer
REDIAL_AFTER = 5.0  # seconds a successful dial is trusted before the next call dials again
MAX_PREFETCH = 16  # tickets asked for ahead at once (prefetch_tickets)
# Direct-channel connections kept per peer once their stream ended, and for how long they are
# reused (the peer keeps them direct.IDLE_TIMEOUT s).
IDLE_PER_PEER = 2
IDLE_REUSE_S = direct.IDLE_TIMEOUT / 3
CLOSE_LINGER = 1.0  # seconds a closed session's stream waits for the peer's end of it
PREFETCH_TIMEOUT = 10.0


def direct_host(addrs: Iterable[str]) -> str | None:
    """The host of a peer's direct channel: that of its first announced addr that is neither a
    relay circuit nor a wildcard (None if there is none)."""
    for a in addrs:
        parts = a.split("/")
        if len(parts) > 2 and parts[1] in ("ip4", "ip6", "dns", "dns4", "dns6"):
            if not is_circuit(a) and parts[2] not in ("0.0.0.0", "::"):
                return parts[2]
    return None


def as_peer_id(peer_id: PeerID | str) -> PeerID:
    return peer_id if isinstance(peer_id, PeerID) else PeerID.from_base58(peer_id)


def _transport_error(e: BaseException, peer: PeerID, what: str) -> SwarmError:
    """A hivemind/transport failure as a typed error (protobuf garbage is the caller's fault)."""
    if isinstance(e, SwarmError):
        return e
    if isinstance(e, asyncio.TimeoutError):
        return PeerTimeout(f"peer {peer}: {what} timed out")
    if isinstance(e, P2PHandlerError) and "DecodeError" in str(e):
        return BadRequest(f"peer {peer} could not parse the {what} request: {e}")
    return PeerUnavailable(f"peer {peer}: {what} failed: {type(e).__name__}: {e}")


TRANSPORT_ERRORS = (
    P2PHandlerError,
    P2PDaemonError,
    ConnectionError,
    OSError,
    EOFError,
    asyncio.IncompleteReadError,
    asyncio.TimeoutError,
)


class PeerClient:
    """RPCs to peers through a hivemind P2P (e.g. `await dht.replicate_p2p()`).

    `compression` is the default codec of what we send and what we ask peers to reply with; each
    call may choose another with `codec=`. `link`: the emulated WAN every request pays
    (swarm.link; none by default).
    """

    def __init__(
        self,
        p2p: P2P,
        compression: str = "none",
        link: Link | None = None,
        use_direct: bool = True,
    ):
        self.p2p = p2p
        self.compression = compression
        self.link = link or NO_LINK
        self._sent: OrderedDict[tuple[str, str], None] = OrderedDict()
        self.adapter_bytes_sent = 0  # adapter tensors sent, in bytes (benchmarks)
        self.addrs: dict[str, tuple[str, ...]] = {}  # peer id -> multiaddrs from its record
        self._dialled: dict[str, float] = {}  # peer id -> when a dial last succeeded
        # Direct channels (swarm.peer.direct): streams go there when the peer announces one.
        self.use_direct = use_direct
        self.direct: dict[str, str] = {}  # peer id -> host of its direct channel
        self._tickets: dict[str, tuple[peer_pb2.DirectTicket, float]] = {}  # and their expiry
        self._direct_down: dict[str, float] = {}  # peer id -> until when libp2p is used
        self.direct_streams = 0  # streams opened on direct channels (benchmarks, tests)
        self.direct_refusals = 0  # direct channels that failed or refused us (refused())
        self._prefetching: dict[str, asyncio.Task] = {}  # peer id -> its ticket being fetched
        self._idle: dict[str, list[direct.Connection]] = {}  # peer id -> connections to reuse
        self.direct_connections = 0  # TCP connections opened for them (benchmarks, tests)

    async def _with_adapter(
        self, peer: PeerID, adapter: AdapterPayload | None, call: Callable[[Any], Awaitable[T]]
    ) -> T:
        """`call(adapter message)`: by hash where the peer got it before, else with tensors.

        A peer that lost it (evicted, restarted) answers AdapterMissing: we resend once.
        """
        if adapter is None:
            return await call(None)
        key = (str(peer), adapter.hash)
        if key in self._sent:
            self._sent.move_to_end(key)
            try:
                return await call(wire.adapter_to_wire(adapter, with_tensors=False))
            except AdapterMissing:
                logger.debug("peer %s lost adapter %s: resending", peer, adapter.hash[:12])
        result = await call(wire.adapter_to_wire(adapter, with_tensors=True))
        self.adapter_bytes_sent += adapter.nbytes
        self._sent[key] = None
        while len(self._sent) > SENT_MEMORY:
            self._sent.popitem(last=False)
        return result

    def learn_addrs(self, records: Iterable[Any]) -> None:
        """Remember the multiaddrs peers announce (relayed peers: their /p2p-circuit ones).

        p2pd finds a peer by itself only through its own DHT, which skips relayed peers and, in
        the namespace test, addrs on documentation ranges: we dial what the record says.
        """
        for r in records:
            addrs = tuple(a for a in getattr(r, "addrs", ()) if isinstance(a, str))
            if addrs:
                self.addrs[r.peer_id] = addrs[:MAX_DIAL_ADDRS]
            host = direct_host(addrs) if getattr(r, "direct_port", 0) else None
            if host is not None:
                self.direct[r.peer_id] = host
            else:
                self.direct.pop(r.peer_id, None)

    async def open_stream(self, peer: PeerID, name: str, timeout: float):
        """(reader, writer) of a new stream to `peer`'s handler `name`: on the peer's direct
        channel when it announces one (swarm.peer.direct), else, or when that fails, on libp2p.
        A failed channel is left alone for direct.DIRECT_RETRY_S.

        A direct stream is returned before the peer answered its hello (the first message goes
        with it): if the peer refused, the first read raises direct.ChannelRefused, nothing
        was served, and the caller calls refused(peer) and opens again (then on libp2p)."""
        key = peer.to_base58()
        if self.direct_reachable(peer) is not None:
            while (idle := self._take_idle(key)) is not None:
                try:  # a connection whose last stream ended cleanly: no handshake
                    reader, writer = idle.next_stream(name)
                except ConnectionError:
                    idle.close()
                    continue
                self.direct_streams += 1
                return reader, writer
            try:
                ticket = await self._ticket(peer, timeout)
                wait = min(timeout / 2, direct.CONNECT_TIMEOUT)  # leave libp2p its half
                reader, writer = await direct.connect(
                    self.direct[key],
                    ticket,
                    name,
                    wait,
                    wait=False,
                    link=self.link,
                    on_idle=functools.partial(self._keep_idle, key),
                )
                self.direct_streams += 1
                self.direct_connections += 1
                return reader, writer
            except (SwarmError, *TRANSPORT_ERRORS) as e:  # ChannelBroken is a ConnectionError
                self.refused(peer, e)
        await self._dial(peer)
        _, reader, writer = await within(self.p2p.call_binary_stream_handler(peer, name), timeout)
        return reader, writer

    def direct_reachable(self, peer: PeerID) -> str | None:
        """The host of `peer`'s direct channel, if it announces one and it is not set aside."""
        key = peer.to_base58()
        host = self.direct.get(key) if self.use_direct else None
        if host is None or self._direct_down.get(key, 0.0) > time.monotonic():
            return None
        return host

    def _keep_idle(self, key: str, connection: direct.Connection) -> None:
        """Keep a connection whose stream ended cleanly for the peer's next stream."""
        idle = self._idle.setdefault(key, [])
        idle.append(connection)
        while len(idle) > IDLE_PER_PEER:
            idle.pop(0).close()

    def _take_idle(self, key: str) -> direct.Connection | None:
        """The newest idle connection to the peer still fresh (IDLE_REUSE_S), or None."""
        idle = self._idle.get(key, [])
        while idle:
            connection = idle.pop()
            if not connection.closed and connection.idle_since > time.monotonic() - IDLE_REUSE_S:
                return connection
            connection.close()
        return None

    def refused(self, peer: PeerID, error: BaseException) -> None:
        """`peer`'s direct channel failed or refused us: libp2p for direct.DIRECT_RETRY_S. An
        idle connection found closed (ChannelStale) only costs a new one."""
        if isinstance(error, direct.ChannelStale):
            logger.debug("idle direct connection to %s was closed: opening a new one", peer)
            return
        key = peer.to_base58()
        self._tickets.pop(key, None)
        self._direct_down[key] = time.monotonic() + direct.DIRECT_RETRY_S
        self.direct_refusals += 1
        logger.info("direct channel to %s failed (%r): using libp2p", peer, error)

    def prefetch_tickets(self, peers) -> None:
        """Ask, in the background, for the tickets of those `peers` that announce a direct
        channel and have none held, so that opening a stream to them later does not wait for
        one (a round trip). Failures are left to open_stream, which asks again."""
        now = time.monotonic()
        for peer in map(as_peer_id, peers):
            key = peer.to_base58()
            held = self._tickets.get(key)
            if self.direct_reachable(peer) is None or key in self._prefetching:
                continue
            if held is not None and held[1] > now:
                continue
            if len(self._prefetching) >= MAX_PREFETCH:
                return
            task = asyncio.ensure_future(self._ticket(peer, PREFETCH_TIMEOUT))
            self._prefetching[key] = task
            task.add_done_callback(lambda _, k=key: self._prefetching.pop(k, None))
            task.add_done_callback(quiet(f"prefetching the ticket of {key}"))

    async def _ticket(self, peer: PeerID, timeout: float) -> peer_pb2.DirectTicket:
        """A ticket to the peer's direct channel: the one held while it lasts, else a new one."""
        key = peer.to_base58()
        held = self._tickets.get(key)
        if held is not None and held[1] > time.monotonic():
            return held[0]
        fetching = self._prefetching.get(key)
        if fetching is not None and fetching is not asyncio.current_task():
            return await within(asyncio.shield(fetching), timeout)
        await self._dial(peer)
        await self.link.send(0)
        reply = await self._stub(peer).rpc_direct_ticket(
            peer_pb2.DirectTicketRequest(), timeout=timeout
        )
        if reply.HasField("error"):
            raise wire.error_from_wire(reply.error, str(peer))
        if (
            len(reply.ticket_id) != direct.ID_BYTES
            or len(reply.secret) != direct.SECRET_BYTES
            or not 0 < reply.port < 65536
        ):
            raise BadRequest(f"peer {peer} sent a malformed direct-channel ticket")
        lasts = min(reply.ttl, direct.TICKET_TTL) - direct.TICKET_MARGIN
        self._tickets[key] = (reply, time.monotonic() + lasts)
        return reply

    async def _dial(self, peer: PeerID) -> None:
        """Connect to a peer at its announced addrs (a no-op for p2pd when connected).

        Failures are left to the call that follows, which forgets the dial if it fails too.
        """
        key = peer.to_base58()
        addrs = self.addrs.get(key)
        if not addrs:
            return
        # A relayed peer's connection dies with its relay: always dial it (p2pd then picks a
        # live circuit); a direct peer's is trusted for REDIAL_AFTER s.
        relayed = any(is_circuit(a) for a in addrs)
        if not relayed and time.monotonic() - self._dialled.get(key, -REDIAL_AFTER) < REDIAL_AFTER:
            return
        try:
            maddrs = [dial_maddr(a) for a in addrs]
            # hivemind's P2P has no public connect: its daemon client is the only way in.
            await within(self.p2p._client.connect(peer, maddrs), DIAL_TIMEOUT)
            self._dialled[key] = time.monotonic()
        except (ValueError, *TRANSPORT_ERRORS) as e:
            self._dialled.pop(key, None)
            logger.debug("dialling %s at its announced addrs failed: %r", peer, e)

    def _stub(self, peer: PeerID):
        return PeerHandler.get_stub(self.p2p, peer)

    async def info(self, peer_id: PeerID | str, timeout: float = 10.0) -> peer_pb2.InfoResponse:
        """The peer's model, span, state, codecs and free cache."""
        peer = as_peer_id(peer_id)
        await self._dial(peer)
        try:
            await self.link.send(0)
            return await self._stub(peer).rpc_info(peer_pb2.InfoRequest(), timeout=timeout)
        except TRANSPORT_ERRORS as e:
            self._dialled.pop(peer.to_base58(), None)
            raise _transport_error(e, peer, "info") from None

    async def ping(self, peer_id: PeerID | str, timeout: float = 2.0) -> float:
        """Seconds of one small round trip (an `info` call) to the peer, for routing.

        Raises PeerUnavailable if it does not answer within `timeout` seconds.
        """
        peer = as_peer_id(peer_id)
        t0 = time.perf_counter()
        try:
            await within(self.info(peer, timeout=timeout), timeout)
        except asyncio.TimeoutError:
            raise PeerTimeout(f"peer {peer}: ping timed out after {timeout:.1f} s") from None
        return time.perf_counter() - t0

    async def forward(
        self,
        peer_id: PeerID | str,
        hidden: torch.Tensor,
        first: int,
        last: int,
        timeout: float = 30.0,
        codec: str | None = None,
        adapter: AdapterPayload | None = None,
    ) -> torch.Tensor:
        """Blocks [first, last) of the peer applied to `hidden` [B, T, H] from position 0.

        codec: of the request and the reply (default: this client's `compression`).
        adapter: a client's LoRA / deep prompts for exactly blocks [first, last).
        """
        codec = codec or self.compression
        encoded = wire.encode(hidden, codec)

        async def call(msg):
            request = peer_pb2.ForwardRequest(
                hidden=encoded, first=first, last=last, reply_codec=codec, adapter=msg
            )
            return await self._call(
                peer_id,
                "rpc_forward",
                "rpc_forward_stream",
                request,
                peer_pb2.ForwardResponse,
                timeout,
            )

        reply = await self._with_adapter(as_peer_id(peer_id), adapter, call)
        _check_applied(reply.adapter, adapter, peer_id)
        return _decoded(reply.hidden, hidden, peer_id)

    async def backward_tuned(
        self,
        peer_id: PeerID | str,
        hidden: torch.Tensor,
        grad_out: torch.Tensor,
        first: int,
        last: int,
        adapter: AdapterPayload,
        timeout: float = 75.0,
        codec: str | None = None,
    ) -> tuple[torch.Tensor, BlockTensors]:
        """Fine-tuning backward: gradients w.r.t. `hidden` and every tensor of `adapter`.

        The peer recomputes blocks [first, last) with the adapter; its base weights stay.
        """
        codec = codec or self.compression
        h, g = wire.encode(hidden, codec), wire.encode(grad_out, codec)

        async def call(msg):
            request = peer_pb2.BackwardRequest(
                hidden=h,
                grad_output=g,
                first=first,
                last=last,
                reply_codec=codec,
                timeout_s=timeout,
                adapter=msg,
            )
            return await self._call(
                peer_id,
                "rpc_backward",
                "rpc_backward_stream",
                request,
                peer_pb2.BackwardResponse,
                timeout,
                reply_bytes=adapter.nbytes + h.ByteSize() + (1 << 16),
            )

        reply = await self._with_adapter(as_peer_id(peer_id), adapter, call)
        grad = _decoded(reply.grad_input, hidden, peer_id)
        try:
            grads = wire.tensors_from_wire(reply.adapter_grads, 1 << 26, "adapter gradient")
        except BadRequest as e:
            raise PeerUnavailable(f"peer {peer_id} replied with bad gradients: {e}") from None
        for b, ts in adapter.tensors.items():
            for n, t in ts.items():
                got = grads.get(b, {}).get(n)
                if got is None or got.shape != t.shape:
                    raise PeerUnavailable(f"peer {peer_id} sent no valid gradient of {b}.{n}")
        return grad, grads

    async def backward(
        self,
        peer_id: PeerID | str,
        hidden: torch.Tensor,
        grad_out: torch.Tensor,
        first: int,
        last: int,
        timeout: float = 75.0,
        codec: str | None = None,
    ) -> torch.Tensor:
        """Gradient w.r.t. `hidden` of (blocks [first, last)(hidden) * grad_out).sum().

        codec: of the request and the reply (default: this client's `compression`).
        """
        grad, _ = await self.backward_counted(
            peer_id, hidden, grad_out, first, last, timeout, codec=codec
        )
        return grad

    async def backward_counted(
        self,
        peer_id: PeerID | str,
        hidden: torch.Tensor,
        grad_out: torch.Tensor,
        first: int,
        last: int,
        timeout: float = 75.0,
        step: int = 0,
        codec: str | None = None,
    ) -> tuple[torch.Tensor, int]:
        """`backward`, and the optimizer step a training peer counts the gradient toward.

        The step is 0 where the peer does not train. A training peer counts the gradient only if
        it finished well within `timeout`, so a call resent after a timeout never counts twice.
        step: the optimizer step it is meant for (0: the coming one; asynchronous training).
        codec: of the request and the reply (default: this client's `compression`).
        """
        codec = codec or self.compression
        request = peer_pb2.BackwardRequest(
            hidden=wire.encode(hidden, codec),
            grad_output=wire.encode(grad_out, codec),
            first=first,
            last=last,
            reply_codec=codec,
            timeout_s=timeout,
            step=step,
        )
        reply = await self._call(
            peer_id,
            "rpc_backward",
            "rpc_backward_stream",
            request,
            peer_pb2.BackwardResponse,
            timeout,
        )
        return _decoded(reply.grad_input, hidden, peer_id), int(reply.step)

    async def _call(
        self,
        peer_id,
        unary: str,
        stream: str,
        request,
        reply_type,
        timeout: float,
        reply_bytes: int = 0,
    ):
        """reply_bytes: what the reply may hold beyond the request's size (adapter gradients):
        a reply over hivemind's unary cap would hang the call, so such calls stream."""
        peer = as_peer_id(peer_id)
        await self._dial(peer)
        stub = self._stub(peer)
        try:
            await self.link.send(request.ByteSize())
            if max(request.ByteSize(), reply_bytes) <= wire.UNARY_LIMIT_BYTES:
                reply = await getattr(stub, unary)(request, timeout=timeout)
            else:
                reply = await within(
                    _stream_call(getattr(stub, stream), request, reply_type), timeout
                )
        except TRANSPORT_ERRORS as e:
            self._dialled.pop(peer.to_base58(), None)
            raise _transport_error(e, peer, unary.removeprefix("rpc_")) from None
        if reply.HasField("error"):
            raise wire.error_from_wire(reply.error, str(peer))
        return reply

    async def push(
        self,
        peer_id: PeerID | str,
        session_id: str,
        hidden: torch.Tensor,
        position: int,
        timeout: float = 10.0,
    ) -> None:
        """Push a step's input into our session on a peer, as its previous hop would (a
        failover's replacement answers us, not the next hop). Lossless: the bits we hold."""
        msg = peer_pb2.PushStep(
            session_id=session_id, hidden=wire.encode(hidden, "none"), position=position
        )
        if msg.ByteSize() > wire.UNARY_LIMIT_BYTES:  # pushes are unary: no stream variant
            raise BadRequest(f"a push of {msg.ByteSize()} bytes is over the unary limit")
        await self._call(peer_id, "rpc_push", "rpc_push", msg, peer_pb2.PushResponse, timeout)

    async def open_inference(
        self,
        peer_id: PeerID | str,
        first: int,
        last: int,
        max_length: int,
        batch_size: int = 1,
        timeout: float = 10.0,
        codec: str | None = None,
        adapter: AdapterPayload | None = None,
        session_id: str | None = None,
        prev_peer: str = "",
    ) -> InferenceStream:
        """Open a session holding up to `max_length` positions of blocks [first, last).

        codec: of every step's input and output (default: this client's `compression`).
        adapter: served with this session's steps only (for exactly blocks [first, last)).
        session_id: the session's id on the peer (default: a fresh one); push mode names it.
        prev_peer: the previous hop's peer id, the only peer that may push into this session.
        Raises CacheFull at once if the peer's cache budget cannot hold batch_size * max_length.
        """

        async def call(msg):
            stream = InferenceStream(
                self,
                as_peer_id(peer_id),
                first,
                last,
                max_length,
                batch_size,
                codec or self.compression,
                session_id,
            )
            await stream._open(timeout, msg, prev_peer)
            return stream

        return await self._with_adapter(as_peer_id(peer_id), adapter, call)


async def _stream_call(method, request, reply_type):
    """One request and one reply over a stream, keeping our side open until every part arrived."""
    done = asyncio.Event()

    async def parts() -> AsyncIterator[peer_pb2.Part]:
        for part in wire.split(request):
            yield part
        await done.wait()  # closing early can lose the reply's last part

    responses = await method(parts())
    try:
        reply = await wire.join(responses, reply_type)
        if reply is None:
            raise PeerUnavailable("the peer closed the stream without replying")
        return reply
    finally:
        done.set()
        await asyncio.sleep(0)
        with contextlib.suppress(Exception):
            await responses.aclose()


def _check_applied(applied: str, adapter, peer) -> None:
    """A peer too old to know adapters ignores them: its reply would be the base model's."""
    want = adapter.hash if adapter is not None else ""
    if applied != want:
        raise PeerUnavailable(f"peer {peer} did not apply the adapter (it may predate adapters)")


def _decoded(msg, like: torch.Tensor, peer: PeerID | str) -> torch.Tensor:
    """A reply's tensor, checked to have the shape of `like` (what we sent) and cast to its dtype.

    A bad reply is the peer's fault, not ours: PeerUnavailable, so callers route around it.
    """
    b, t, h = like.shape
    try:
        x = wire.decode(msg, "the reply", hidden_size=h, max_tokens=b * t, batch_size=b, seq_len=t)
    except wire.WireFormatError as e:
        raise PeerUnavailable(f"peer {peer} replied with a bad tensor: {e}") from None
    return x if x.dtype == like.dtype else x.to(like.dtype)  # a torch call less per step


class InferenceStream:
    """An open inference session on one peer. Steps run in order; close() frees the session.

    After any error the session is gone on the peer: open a new one (and replay) to go on.
    """

    def __init__(
        self,
        client: PeerClient,
        peer: PeerID,
        first: int,
        last: int,
        max_length: int,
        batch: int,
        codec: str,
        session_id: str | None = None,
    ):
        self.client, self.peer, self.codec = client, peer, codec
        self.first, self.last, self.max_length, self.batch_size = first, last, max_length, batch
        self.session_id = session_id or uuid.uuid4().hex
        self.length = 0  # positions the peer's cache holds
        self.supports_push = False  # the peer said so when the session opened
        # Set when the peer reports that pushing a step's output to the next hop failed.
        self.push_failed: asyncio.Future = asyncio.get_running_loop().create_future()
        self._new_stream()
        self._next_step = 0  # the id of the coming step
        self._watched = -1  # the step whose push failure watch_push() reports
        self._lock = asyncio.Lock()

    def _new_stream(self) -> None:
        """The state of the stream under the session (a fresh one: at first, and when a direct
        channel refused the first and the session opens on libp2p)."""
        self.closed = False
        self._queue: asyncio.Queue = asyncio.Queue()
        self._responses = None
        self._replies: asyncio.Queue = asyncio.Queue()  # filled by _read, in stream order
        self._reader: asyncio.Task | None = None
        self._writer = None  # the stream's, once open

    async def _requests(self) -> AsyncIterator[peer_pb2.Part]:
        while (msg := await self._queue.get()) is not None:
            for part in wire.split(msg):
                yield part

    def encode(self, hidden: torch.Tensor) -> tuple[tensor_pb2.Tensor, torch.Tensor]:
        """`hidden` encoded for a step (pass it as `encoded=`), and as the peer decodes it: what
        a bit-exact replay sends. Encoding what was decoded again would not give the same bits
        (the scales travel in bf16), so a step that is replayed later is encoded once, here."""
        msg = wire.encode(hidden, self.codec)
        return msg, hidden if self.codec == "none" else _decoded(msg, hidden, self.peer)

    def watch_push(self) -> asyncio.Future:
        """A future set if the peer reports that the coming step's push failed (reports of
        earlier steps come late and were handled: such a step was re-routed)."""
        self._watched = self._next_step
        self.push_failed = asyncio.get_running_loop().create_future()
        return self.push_failed

    async def _read(self) -> None:
        """Read every reply as it comes: push failures are set aside, the rest queued in order."""
        try:
            while True:
                reply = await wire.join(self._responses, peer_pb2.InferenceResponse)
                if reply is not None and reply.HasField("push_failed"):
                    if reply.step_id == self._watched and not self.push_failed.done():
                        error = wire.error_from_wire(reply.push_failed, str(self.peer))
                        self.push_failed.set_result(error)
                    continue
                self._replies.put_nowait(reply)
                if reply is None:
                    return
        except BaseException as e:
            self._replies.put_nowait(e)

    async def _exchange(self, request: peer_pb2.InferenceRequest, timeout: float, end=False):
        if self.closed:
            raise PeerUnavailable(f"the session on peer {self.peer} is closed")
        await self.client.link.send(request.ByteSize())
        self._queue.put_nowait(request)
        if end:
            self._queue.put_nowait(None)
        try:
            async with asyncio.timeout(timeout):  # not wait_for: no task per step
                reply = await self._replies.get()
            if isinstance(reply, BaseException):
                raise reply
        except direct.ChannelRefused:
            await self._shutdown()
            raise  # nothing was served: _open goes on over libp2p
        except (BadRequest, *TRANSPORT_ERRORS) as e:
            await self._shutdown()
            raise _transport_error(e, self.peer, "inference") from None
        if reply is None:
            await self._shutdown()
            raise PeerUnavailable(f"peer {self.peer} closed the inference stream")
        if reply.HasField("error"):
            await self._shutdown()
            raise wire.error_from_wire(reply.error, str(self.peer))
        return reply

    async def _open(
        self, timeout: float, adapter: peer_pb2.Adapter | None = None, prev_peer: str = ""
    ) -> None:
        try:
            await self._open_once(timeout, adapter, prev_peer)
        except direct.ChannelRefused as e:  # the direct channel refused our hello (a stale
            self.client.refused(self.peer, e)  # ticket: the peer restarted): libp2p
            self._new_stream()
            await self._open_once(timeout, adapter, prev_peer)

    async def _open_once(
        self, timeout: float, adapter: peer_pb2.Adapter | None, prev_peer: str
    ) -> None:
        name = PeerHandler._get_handle_name(None, "rpc_inference")
        try:
            reader, writer = await self.client.open_stream(self.peer, name, timeout)
            self._writer = writer
            self._responses = streams.stream_over(
                reader, writer, name, self.peer, self._requests(), peer_pb2.Part, PART_MESSAGE_BYTES
            )
        except TRANSPORT_ERRORS as e:
            self.closed = True
            raise _transport_error(e, self.peer, "open inference") from None
        self._reader = asyncio.ensure_future(self._read())
        open_msg = peer_pb2.OpenSession(
            prev_peer=prev_peer,
            session_id=self.session_id,
            first=self.first,
            last=self.last,
            max_length=self.max_length,
            batch_size=self.batch_size,
            reply_codec=self.codec,
            adapter=adapter,
        )
        reply = await self._exchange(peer_pb2.InferenceRequest(open=open_msg), timeout)
        if adapter is not None and reply.adapter != adapter.hash:
            await self._shutdown()
            _check_applied(reply.adapter, adapter, self.peer)
        self.supports_push = reply.push

    async def step(
        self,
        hidden: torch.Tensor,
        position: int,
        timeout: float = 30.0,
        pushed: bool = False,
        push_to: tuple[str, str] | None = None,
        prev_peer: str = "",
        steps: Sequence[int] = (),
        codec: str | None = None,
        encoded: tensor_pb2.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states [B, T, H] for positions [position, position + T) through the span.

        `position` may be below `self.length` to replay after a failure; never above it.
        Push mode: with `pushed`, `hidden` is not sent (only its shape matters): the previous
        hop pushes it; `push_to` (peer id, session id): the peer pushes its output there;
        `prev_peer`: the previous hop from now on. The reply is the output all the same.
        `steps`: a replay's lengths of the steps that first built these positions (summing
        to T): the peer runs them one by one, rebuilding its cache bit for bit.
        `codec`: of this step's input only (a replay sends "none": what the peer first saw).
        `encoded`: `hidden` as self.encode() gave it (not encoded again).
        """
        async with self._lock:
            step_id, self._next_step = self._next_step, self._next_step + 1
            msg = peer_pb2.InferenceStep(
                session_id=self.session_id,
                position=position,
                step_id=step_id,
                pushed=pushed,
                length=hidden.shape[1] if pushed else 0,
                prev_peer=prev_peer,
                steps=list(steps),
            )
            if encoded is not None:
                msg.hidden.CopyFrom(encoded)
            elif not pushed:
                msg.hidden.CopyFrom(wire.encode(hidden, codec or self.codec))
            if push_to is not None:
                msg.push_peer, msg.push_session = push_to
            reply = await self._exchange(peer_pb2.InferenceRequest(step=msg), timeout)
            if reply.step_id != step_id:
                await self._shutdown()
                raise PeerUnavailable(
                    f"peer {self.peer} answered step {reply.step_id}, not {step_id}"
                )
            self.length = reply.length
            return _decoded(reply.hidden, hidden, self.peer)

    async def close(self, timeout: float = 5.0) -> None:
        """Free the session on the peer; never raises (the peer frees it on timeout anyway)."""
        if self.closed:
            return
        async with self._lock:
            t0 = time.monotonic()
            ended = False
            with contextlib.suppress(SwarmError):
                close = peer_pb2.CloseSession(session_id=self.session_id)
                # Our request stream ends with the close (the peer then ends its own at once).
                await self._exchange(peer_pb2.InferenceRequest(close=close), timeout, end=True)
                ended = True
            logger.debug("closed session on %s in %.3f s", self.peer, time.monotonic() - t0)
            await self._shutdown(CLOSE_LINGER if ended else 0.0)

    async def _shutdown(self, linger: float = 0.0) -> None:
        """End the stream. linger: seconds to wait for the peer's end of it first (a direct
        channel's connection is then reused for the next stream)."""
        if self.closed:
            return
        self.closed = True
        self._queue.put_nowait(None)  # ends our request stream after the peer has replied
        await asyncio.sleep(0)
        if linger and self._reader is not None and isinstance(self._writer, direct.SealedWriter):
            await asyncio.wait({self._reader}, timeout=linger)
        if self._reader is not None:
            self._reader.cancel()
        if self._responses is not None:
            with contextlib.suppress(Exception):
                await within(self._responses.aclose(), 1.0)

    async def __aenter__(self) -> InferenceStream:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
