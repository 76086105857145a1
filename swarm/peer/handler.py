"""The peer's RPC handlers over hivemind P2P: info, forward, backward and inference sessions.

Registered by `swarm.peer.server.Peer`; called through `swarm.peer.client.PeerClient`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import itertools
import logging
import math
import time
import uuid
from collections.abc import Hashable
from typing import AsyncIterator  # noqa: UP035 - hivemind reads typing.AsyncIterator hints

import torch
from hivemind.p2p import P2P, P2PContext, PeerID, ServicerBase

import kernels
from proto import peer_pb2
from swarm import trace
from swarm.errors import BadRequest, PeerUnavailable, SessionExpired
from swarm.link import Link
from swarm.loops import within
from swarm.model.lora import TARGETS, AdapterSpec, block_shapes
from swarm.peer import streams, wire
from swarm.peer.adapters import AdapterCache, AdapterEntry
from swarm.peer.backend import Session, SpanBackend, StepItem
from swarm.peer.config import PeerConfig
from swarm.peer.direct import DirectServer
from swarm.peer.fairness import ClientLedger
from swarm.peer.memory import ByteBudget, CacheBudget, Held, PeerBusy
from swarm.peer.push import Pushes
from swarm.peer.worker import ComputeWorker

logger = logging.getLogger(__name__)

DRAIN_TIMEOUT = 5.0  # how long we read a finished stream's leftovers before dropping it
ENCODE_IN_THREAD = 1 << 16  # replies with more elements are encoded off the event loop
# Share of a backward's timeout within which a training peer still counts its gradient.
COMMIT_FRACTION = 0.8
# Slack over the largest legitimate request: protobuf framing, codec scales, a part's rounding.
REQUEST_HEADROOM = 1 << 20
PART_MESSAGE_BYTES = wire.PART_BYTES + 1024  # a Part message: its data and a few fields
TRIM_AFTER_BYTES = 32 << 20  # after freeing a request this large, hand freed heap back to the OS
PUSH_ACKS_AHEAD = 16  # acknowledgements a push stream may owe before we stop reading it
# A refusal that ends the stream unread: draining it would read what we refused.
REFUSED = (wire.RequestTooLarge, streams.MessageTooLarge, PeerBusy)


class PeerHandler(ServicerBase):
    """Serves the span held in `self.backend`; the server swaps it when rebalancing."""

    # ServicerBase caches handlers per class: reset them so every rpc_* here is collected.
    _rpc_handlers = None
    _stub_type = None

    def __init__(
        self,
        backend: SpanBackend,
        worker: ComputeWorker,
        budget: CacheBudget,
        config: PeerConfig,
        model_prefix: str,
        link: Link | None = None,
    ):
        self.backend = backend
        self.worker = worker
        self.budget = budget
        self.config = config
        self.model_prefix = model_prefix
        self.hidden_size = backend.config.hidden_size
        self.state = "joining"
        self.throughput = 0.0
        self.draining = False
        self.sessions: dict[str, Session] = {}
        self._owners: dict[str, Hashable] = {}  # session id -> the client that opened it
        self.inflight = 0
        self.clients = ClientLedger(
            max_sessions=config.client_sessions,
            max_cache_tokens=max(1, int(config.client_cache_share * budget.total)),
            max_requests=config.client_requests,
        )
        self.codecs = sorted(kernels.CODECS)
        self.link = link or Link(config.link_delay, config.link_bandwidth)  # --link-delay
        self.pushes = Pushes(
            self.link,
            self._decode,
            self.get_stub,
            config.request_timeout,
            stream_name=self._get_handle_name(None, "rpc_push_stream"),
        )
        self._push_streams: dict[Hashable, asyncio.Event] = {}  # sender -> "end your stream"
        self.direct = DirectServer({})  # listens once start_direct is called
        self.adapters = AdapterCache(
            backend.config,
            max_bytes=int(config.adapter_cache_mb * (1 << 20)),
            max_entries=config.max_adapters,
            max_rank=config.max_adapter_rank,
            max_pre_seq_len=config.max_pre_seq_len,
        )
        # Never below one largest request, so a legitimate one always fits when alone; a
        # client holds at most half, so the others always find room.
        largest = self.max_request_bytes(2)
        total = max(int(config.request_memory_mb * (1 << 20)), largest)
        self.request_bytes = ByteBudget(total, per_client=max(total // 2, largest))

    async def add_p2p_handlers(self, p2p: P2P, wrapper=None, *, namespace=None, balanced=False):
        """As ServicerBase's, but streams read through bounded readers (hivemind's take any
        length prefix and buffer it whole)."""
        self._collect_rpc_handlers()
        self.pushes.p2p = p2p  # pushes go out through it
        for h in self._rpc_handlers:
            name = self._get_handle_name(namespace, h.method_name)
            method = getattr(self if wrapper is None else wrapper, h.method_name)
            if h.stream_input:
                handle = streams.stream_server(
                    name, method, h.request_type, PART_MESSAGE_BYTES, p2p.peer_id
                )
                self.direct.handlers[name] = handle  # the same streams on the direct channel
                await p2p.add_binary_stream_handler(name, handle, balanced=balanced)
            else:  # unary: the daemon caps each message (4 MiB) before we see it
                await p2p.add_protobuf_handler(
                    name, method, h.request_type, stream_output=h.stream_output, balanced=balanced
                )

    async def start_direct(self, host: str, port: int = 0) -> int:
        """Serve the stream handlers on the direct channel too (swarm.peer.direct); its port."""
        return await self.direct.start(host, port)

    async def rpc_direct_ticket(
        self, request: peer_pb2.DirectTicketRequest, context: P2PContext
    ) -> peer_pb2.DirectTicket:
        """A ticket to the direct channel, bound to the caller's peer id (libp2p authenticated
        it, and the libp2p stream keeps the secret)."""
        await self.link.send(0)
        if not self.direct.port:
            return peer_pb2.DirectTicket(
                error=self._report(PeerUnavailable("no direct channel here"), "ticket", context)
            )
        return self.direct.ticket(context.remote_id)

    # ---- limits -------------------------------------------------------------------------------
    def max_request_bytes(self, tensors: int) -> int:
        """The largest legitimate request carrying `tensors` activations: each of up to
        max_request_tokens x hidden float32, an adapter of the whole span, and headroom."""
        activations = self.config.max_request_tokens * self.hidden_size * 4
        return tensors * activations + self._max_adapter_bytes() + REQUEST_HEADROOM

    def _max_adapter_bytes(self) -> int:
        backend, cache = self.backend, self.adapters
        if not backend.serves_adapters or not cache.max_entries:
            return 0
        spec = AdapterSpec(
            rank=cache.max_rank, targets=tuple(TARGETS), pre_seq_len=cache.max_pre_seq_len
        )
        per_block = sum(
            4 * math.prod(shape) + 64 for shape in block_shapes(backend.config, spec).values()
        )
        return min(cache.max_bytes, per_block * (backend.end - backend.start))

    # ---- info -------------------------------------------------------------------------------
    async def rpc_info(
        self, request: peer_pb2.InfoRequest, context: P2PContext
    ) -> peer_pb2.InfoResponse:
        b = self.backend
        await self.link.send(0)
        return peer_pb2.InfoResponse(
            model=self.model_prefix,
            start=b.start,
            end=b.end,
            version=self.config.version,
            codecs=self.codecs,
            cache_tokens_left=self.budget.left,
            cache_tokens_total=self.budget.total,
            state="offline" if self.draining else self.state,
            quant=self.config.quant,
            hidden_size=self.hidden_size,
            num_blocks=b.config.num_layers,
            throughput=self.throughput,
            max_request_tokens=self.config.max_request_tokens,
            dtype=str(b.dtype).removeprefix("torch."),
        )

    # ---- forward / backward -------------------------------------------------------------------
    async def rpc_forward(
        self, request: peer_pb2.ForwardRequest, context: P2PContext
    ) -> peer_pb2.ForwardResponse:
        try:
            reply = await self._forward(request, context.remote_id)
        except Exception as e:
            reply = peer_pb2.ForwardResponse(error=self._report(e, "forward", context))
        return await self._unary(reply)

    def rpc_forward_stream(
        self, requests: AsyncIterator[peer_pb2.Part], context: P2PContext
    ) -> AsyncIterator[peer_pb2.Part]:
        return self._streamed(
            requests, context, peer_pb2.ForwardRequest, peer_pb2.ForwardResponse, 1, self._forward
        )

    async def rpc_backward(
        self, request: peer_pb2.BackwardRequest, context: P2PContext
    ) -> peer_pb2.BackwardResponse:
        try:
            reply = await self._backward(request, context.remote_id)
        except Exception as e:
            reply = peer_pb2.BackwardResponse(error=self._report(e, "backward", context))
        return await self._unary(reply)

    def rpc_backward_stream(
        self, requests: AsyncIterator[peer_pb2.Part], context: P2PContext
    ) -> AsyncIterator[peer_pb2.Part]:
        return self._streamed(
            requests,
            context,
            peer_pb2.BackwardRequest,
            peer_pb2.BackwardResponse,
            2,
            self._backward,
        )

    async def _streamed(self, requests, context, request_type, reply_type, tensors: int, serve):
        """A streamed forward or backward: one request of up to `tensors` activations read
        within the request memory, served, and its reply streamed back in parts."""
        held = Held(self.request_bytes, context.remote_id)
        what = "forward" if reply_type is peer_pb2.ForwardResponse else "backward"
        try:
            try:
                max_bytes = self.max_request_bytes(tensors)
                request = await self._read_one(requests, request_type, held, max_bytes)
                reply = await serve(request, context.remote_id)
            except Exception as e:
                reply = reply_type(error=self._report(e, what, context))
                refused = isinstance(e, REFUSED)
            else:
                refused = False
            async for part in self._parts(reply):
                yield part
        finally:
            self._release(held)
        if not refused:
            await _drain(requests)

    async def _read_one(
        self, requests: AsyncIterator[peer_pb2.Part], msg_type, held: Held, max_bytes: int
    ):
        """One request, refused from its first part's header if it declares more than
        `max_bytes` or than the peer's request memory has left (held until `held` is released)."""
        try:
            msg = await within(
                wire.join(requests, msg_type, max_bytes, held.reserve), self.config.request_timeout
            )
        except asyncio.TimeoutError:
            raise BadRequest("the request did not arrive in time") from None
        if msg is None:
            raise BadRequest("the stream ended before a request arrived")
        return msg

    async def _forward(
        self, request: peer_pb2.ForwardRequest, client: Hashable
    ) -> peer_pb2.ForwardResponse:
        backend = self.backend
        first, last = self._check_range(backend, request.first, request.last)
        hidden = self._decode(request.hidden, "hidden")
        codec = self._reply_codec(request.reply_codec)
        adapter, seed = await self._adapter(request, first, last)
        out = await self._compute(
            client, lambda: backend.forward(hidden, first, last, adapter, seed)
        )
        applied = adapter.hash if adapter is not None else ""
        return peer_pb2.ForwardResponse(hidden=await self._encode(out, codec), adapter=applied)

    async def _backward(
        self, request: peer_pb2.BackwardRequest, client: Hashable
    ) -> peer_pb2.BackwardResponse:
        received = time.monotonic()
        backend = self.backend
        first, last = self._check_range(backend, request.first, request.last)
        hidden = self._decode(request.hidden, "hidden")
        grad = self._decode(request.grad_output, "grad_output")
        if grad.shape != hidden.shape:
            raise BadRequest(f"grad_output {list(grad.shape)} != hidden {list(hidden.shape)}")
        codec = self._reply_codec(request.reply_codec)
        budget = request.timeout_s
        if not math.isfinite(budget) or budget < 0:
            raise BadRequest(f"timeout_s must be a non-negative number, got {budget}")
        # Commit only well before the caller gives up: a call it resends elsewhere never counts
        # twice as long as the round trip takes under a fifth of its timeout.
        deadline = received + COMMIT_FRACTION * budget if budget > 0 else None
        if request.HasField("adapter"):
            return await self._backward_tuned(request, hidden, grad, first, last, codec, client)
        out, step = await self._compute(
            client,
            lambda: backend.backward_counted(
                hidden, grad, first, last, deadline, int(request.step)
            ),
        )
        return peer_pb2.BackwardResponse(grad_input=await self._encode(out, codec), step=step)

    async def _backward_tuned(self, request, hidden, grad, first, last, codec: str, client):
        """Fine-tuning: input and adapter gradients; never counted by training peers."""
        backend = self.backend
        adapter, seed = await self._adapter(request, first, last)
        out, grads = await self._compute(
            client, lambda: backend.backward_tuned(hidden, grad, first, last, adapter, seed)
        )
        return peer_pb2.BackwardResponse(
            grad_input=await self._encode(out, codec), adapter_grads=wire.tensors_to_wire(grads)
        )

    async def _adapter(self, request, first: int, last: int) -> tuple[AdapterEntry | None, int]:
        """The request's adapter from the cache, or checked and cached from its tensors."""
        if not request.HasField("adapter"):
            return None, 0
        if not self.backend.serves_adapters:
            raise BadRequest("this peer trains its blocks and serves no adapters")
        cache = self.adapters
        spec, tensors, key, seed = wire.adapter_from_wire(
            request.adapter, cache.max_elements(), max_total=cache.max_bytes // 4
        )
        cache.check_spec(spec)
        if tensors is None:
            entry = cache.get(key, first, last)
        else:
            entry = await asyncio.to_thread(cache.put, key, spec, tensors, first, last)
        if entry.spec != spec:
            raise BadRequest(f"adapter {key[:12]} was cached with another spec")
        return entry, seed

    # ---- inference sessions -------------------------------------------------------------------
    async def rpc_inference(
        self, requests: AsyncIterator[peer_pb2.Part], context: P2PContext
    ) -> AsyncIterator[peer_pb2.Part]:
        """One stream = one session: open, steps (possibly rewinding), close."""
        session: Session | None = None
        client = context.remote_id
        held = Held(self.request_bytes, client)
        refused = False
        try:
            while True:
                held.release()  # the previous message is served
                request = await self._next_request(requests, session, held)
                if request is None:
                    return  # the client went away without closing: `finally` frees the session
                kind = request.WhichOneof("kind")
                if kind == "open" and session is None:
                    session = await self._open(request.open, client)
                    reply = peer_pb2.InferenceResponse(
                        opened=True, length=0, adapter=session.adapter_key, push=True
                    )
                elif kind == "open":
                    raise BadRequest("this stream already has a session open")
                elif kind == "step":
                    session = self._check_session(session, request.step.session_id)
                    reply, push = await self._step(session, request.step, client)
                    async for part in self._parts(reply):
                        yield part
                    trace.event("replied")
                    trace.flush()
                    # The next request cannot come before the pushed output went on anyway.
                    failed = await self.pushes.failure(push)
                    if failed is not None:
                        reply = peer_pb2.InferenceResponse(
                            push_failed=failed, step_id=request.step.step_id
                        )
                        async for part in self._parts(reply):
                            yield part
                    continue
                elif kind == "close":
                    self._check_session(session, request.close.session_id)
                    reply = peer_pb2.InferenceResponse(closed=True, length=session.length)
                    async for part in self._parts(reply):
                        yield part
                    break
                else:
                    raise BadRequest("an inference request must hold open, step or close")
                async for part in self._parts(reply):
                    yield part
        except Exception as e:
            refused = isinstance(e, REFUSED)
            reply = peer_pb2.InferenceResponse(error=self._report(e, "inference", context))
            async for part in self._parts(reply):
                yield part
        finally:
            self._release(held)
            self._free(session)
        if not refused:
            await _drain(requests)

    async def _next_request(self, requests, session: Session | None, held: Held):
        timeout = self.config.session_timeout if session else self.config.request_timeout
        max_bytes = self.max_request_bytes(1)
        try:  # asyncio.timeout, not wait_for: no task per step
            async with asyncio.timeout(timeout):
                return await wire.join(requests, peer_pb2.InferenceRequest, max_bytes, held.reserve)
        except TimeoutError:
            raise SessionExpired(f"no request for {timeout:.0f} s: the session was freed") from None

    def _check_session(self, session: Session | None, session_id: str) -> Session:
        if session is None or session.session_id != session_id:
            raise SessionExpired(
                f"unknown session {session_id!r}: open one first (sessions live on one stream)"
            )
        return session

    async def _open(self, req: peer_pb2.OpenSession, client: Hashable) -> Session:
        if self.draining:
            raise PeerUnavailable("the peer is shutting down and takes no new sessions")
        backend = self.backend
        first, last = self._check_range(backend, req.first, req.last)
        max_pos = backend.config.max_position_embeddings
        if not 0 < req.max_length <= max_pos:
            raise BadRequest(f"max_length must be in 1..{max_pos}, got {req.max_length}")
        if not 0 < req.batch_size <= self.config.max_request_tokens:
            raise BadRequest(f"batch_size must be in 1..{self.config.max_request_tokens}")
        session_id = req.session_id or uuid.uuid4().hex
        if session_id in self.sessions:
            raise BadRequest(f"session {session_id!r} is already open")
        adapter, _ = await self._adapter(req, first, last)
        tokens = self.budget.allocate(req.batch_size * req.max_length)
        try:  # then this client's share: CacheFull naming its limit
            self.clients.open_session(client, tokens, left_after=self.budget.left)
        except BaseException:
            self.budget.free(tokens)
            raise
        try:
            caches = await self.worker.call(
                lambda: backend.new_caches(req.batch_size, req.max_length, first, last), client
            )
        except BaseException:
            self.budget.free(tokens)
            self.clients.close_session(client, tokens)
            raise
        session = Session(
            session_id, first, last, req.max_length, req.batch_size, caches, backend, tokens=tokens
        )
        session.reply_codec = self._reply_codec(req.reply_codec)
        if adapter is not None:
            self.adapters.pin(adapter)
            session.adapter = adapter
        self.sessions[session_id] = session
        self._owners[session_id] = client
        self.pushes.open(session_id, req.prev_peer, req.batch_size)
        return session

    async def _step(self, session: Session, step: peer_pb2.InferenceStep, client: Hashable):
        """One step: its reply, and the push of its output to the next hop (a task) if asked."""
        trace.event("request")
        if step.prev_peer:
            self.pushes.set_prev(session.session_id, step.prev_peer)
        if step.push_peer:
            try:
                next_peer = PeerID.from_base58(step.push_peer)
            except Exception:
                raise BadRequest(f"push_peer {step.push_peer[:64]!r} is not a peer id") from None
        if step.pushed:
            hidden = await self.pushes.input(session.session_id, step)
        else:
            hidden = self._decode(step.hidden, "hidden", batch_size=session.batch_size)
        t = hidden.shape[1]
        trace.event("input")
        if step.position > session.length:
            raise BadRequest(
                f"position {step.position} skips ahead: the session holds {session.length} "
                "positions (send from at most there; earlier positions replay)"
            )
        if step.position + t > session.max_length:
            raise BadRequest(
                f"positions {step.position}..{step.position + t} exceed the session's "
                f"max_length {session.max_length}"
            )
        # A replay runs in the shapes that first built the cache, all in one worker call.
        chunks = _chunks(step.steps, t)
        items = [
            StepItem(session, hidden if len(chunks) == 1 else hidden[:, a:b], step.position + a)
            for a, b in chunks
        ]
        with self.clients.request(client):
            self.inflight += 1
            try:
                if len(items) == 1:
                    work = self.worker.step(items[0], client)
                else:
                    run = session.backend.inference_step
                    work = self.worker.call(lambda: [run([it])[0] for it in items], client)
                async with asyncio.timeout(self.config.request_timeout):
                    outs = await work
            finally:
                self.inflight -= 1
        out = outs if len(items) == 1 else torch.cat(outs, dim=1)
        session.length = step.position + t
        encoded = await self._encode(out, session.reply_codec)  # once: for the client and the push
        push = None
        if step.push_peer:
            msg = peer_pb2.PushStep(
                session_id=step.push_session, hidden=encoded, position=step.position
            )
            push = self.pushes.start(next_peer, msg)
            trace.event("pushed")
        reply = peer_pb2.InferenceResponse(
            hidden=encoded, step_id=step.step_id, length=session.length
        )
        return reply, push

    # ---- server-to-server push ------------------------------------------------------------------
    async def rpc_push(
        self, request: peer_pb2.PushStep, context: P2PContext
    ) -> peer_pb2.PushResponse:
        """A previous hop's output for one of our sessions: queued for its pushed step."""
        return await self._unary(self._accept_push(request, context))

    async def rpc_push_stream(
        self, requests: AsyncIterator[peer_pb2.Part], context: P2PContext
    ) -> AsyncIterator[peer_pb2.PushResponse]:
        """A previous hop's pushes, one stream per sender (a newer one ends the older): each is
        accepted as rpc_push accepts it, as soon as it arrives, and acknowledged in order after
        the emulated link's delay. Ends after a session timeout without a push."""
        sender = context.remote_id
        if (older := self._push_streams.get(sender)) is not None:
            older.set()
        ended = self._push_streams[sender] = asyncio.Event()
        acks: asyncio.Queue = asyncio.Queue(PUSH_ACKS_AHEAD)  # full: we stop reading pushes

        def paid(
            reply: peer_pb2.PushResponse,
        ) -> tuple[asyncio.Future | None, peer_pb2.PushResponse]:
            # The emulated link's delay starts now, so acknowledgements travel in parallel.
            delay = self.link.send(reply.ByteSize()) if self.link.emulated else None
            return (None if delay is None else asyncio.ensure_future(delay)), reply

        async def read() -> None:
            held = Held(self.request_bytes, sender)
            max_bytes = self.max_request_bytes(1)
            try:
                while True:
                    held.release()
                    async with asyncio.timeout(self.config.session_timeout):
                        msg = await wire.join(requests, peer_pb2.PushStep, max_bytes, held.reserve)
                    if msg is None:
                        return
                    await acks.put(paid(self._accept_push(msg, context)))
            except TimeoutError:
                return  # idle: the sender opens a new stream when it pushes again
            except Exception as e:  # refused (too large, malformed): said, then ended
                await acks.put(paid(peer_pb2.PushResponse(error=self._report(e, "push", context))))
            finally:
                self._release(held)

        reading = asyncio.ensure_future(read())
        stop = asyncio.ensure_future(ended.wait())
        got: asyncio.Future | None = None
        try:
            while not (reading.done() and acks.empty()):
                got = asyncio.ensure_future(acks.get())
                await asyncio.wait((got, stop, reading), return_when=asyncio.FIRST_COMPLETED)
                if stop.done():
                    return  # a newer stream from the same sender took over
                if not got.done():
                    got.cancel()
                    continue  # reading ended: what it queued is sent first
                delay, reply = got.result()
                if delay is not None:
                    await delay
                yield reply
        finally:
            for task in (got, stop, reading):
                if task is not None:
                    task.cancel()
            if self._push_streams.get(sender) is ended:
                del self._push_streams[sender]

    def _accept_push(self, request: peer_pb2.PushStep, context: P2PContext):
        try:
            if request.session_id not in self.sessions:
                raise SessionExpired(
                    f"unknown session {request.session_id[:64]!r}: nothing to push to"
                )
            self.pushes.accept(request, context.remote_id, self._owners.get(request.session_id))
            trace.event("push_accepted")
            return peer_pb2.PushResponse()
        except Exception as e:
            return peer_pb2.PushResponse(error=self._report(e, "push", context))

    def _free(self, session: Session | None) -> None:
        if session is None:
            return
        if self.sessions.get(session.session_id) is session:
            del self.sessions[session.session_id]
            self.pushes.free(session.session_id)
            self.clients.close_session(self._owners.pop(session.session_id), session.tokens)
        self.budget.free(session.tokens)
        session.tokens = 0
        session.caches = []
        if session.adapter is not None:
            self.adapters.unpin(session.adapter)
            session.adapter = None

    # ---- helpers ------------------------------------------------------------------------------
    async def _compute(self, client: Hashable, fn):
        """Run `fn` on the worker as `client`'s request (counted against its share)."""
        with self.clients.request(client):
            self.inflight += 1
            try:
                return await within(self.worker.call(fn, client), self.config.request_timeout)
            finally:
                self.inflight -= 1

    def _release(self, held: Held) -> None:
        nbytes = held.nbytes
        held.release()
        if nbytes >= TRIM_AFTER_BYTES:  # glibc keeps freed arenas; large requests leave many
            with contextlib.suppress(RuntimeError):  # no loop: a generator finalized late
                asyncio.get_running_loop().run_in_executor(None, _malloc_trim)

    def _check_range(self, backend: SpanBackend, first: int, last: int) -> tuple[int, int]:
        if not backend.start <= first < last <= backend.end:
            raise BadRequest(
                f"blocks {first}:{last} are not inside this peer's span "
                f"{backend.start}:{backend.end}"
            )
        return first, last

    def _decode(self, msg, what: str, batch_size: int | None = None) -> torch.Tensor:
        return wire.decode(
            msg,
            what,
            hidden_size=self.hidden_size,
            max_tokens=self.config.max_request_tokens,
            batch_size=batch_size,
        )

    def _reply_codec(self, codec: str) -> str:
        codec = codec or self.config.compression
        if not kernels.is_valid_codec(codec):
            raise BadRequest(f"unknown reply codec {codec!r}; this peer knows {self.codecs}")
        return codec

    async def _encode(self, x: torch.Tensor, codec: str):
        if x.numel() > ENCODE_IN_THREAD:
            return await asyncio.to_thread(wire.encode, x, codec)
        return wire.encode(x, codec)

    async def _parts(self, reply) -> AsyncIterator[peer_pb2.Part]:
        """A reply's stream parts, after the emulated link (--link-delay) carried it."""
        await self.link.send(reply.ByteSize())
        for part in wire.split(reply):
            yield part

    async def _unary(self, reply):
        await self.link.send(reply.ByteSize())
        return reply

    def _report(self, e: Exception, what: str, context: P2PContext):
        if isinstance(e, asyncio.TimeoutError):
            e = PeerUnavailable(f"{what} took longer than {self.config.request_timeout:.0f} s")
        err = wire.error_to_wire(e)
        if err.kind == "Internal":
            logger.exception("%s from %s failed", what, context.remote_id)
        else:
            logger.info("%s from %s refused: %s", what, context.remote_id, e)
        return err

    async def close_all_sessions(self) -> None:
        for session in list(self.sessions.values()):
            self._free(session)
        self.pushes.close()
        await self.direct.close()


def _chunks(steps, t: int) -> list[tuple[int, int]]:
    """[start, end) of each step a replay's T positions were first built in (one if none)."""
    if not steps:
        return [(0, t)]
    if len(steps) > t or any(n <= 0 for n in steps) or sum(steps) != t:
        raise BadRequest(f"a step's `steps` must be {t} positions in up to {t} positive parts")
    bounds = [0, *itertools.accumulate(steps)]
    return list(itertools.pairwise(bounds))


async def _drain(requests: AsyncIterator) -> None:
    """Read what the client still sends, so our last reply is not lost (DESIGN: streams)."""
    with contextlib.suppress(Exception):
        await within(_consume(requests), DRAIN_TIMEOUT)


async def _consume(requests: AsyncIterator) -> None:
    async for _ in requests:
        pass


def _malloc_trim() -> None:
    """Return the C heap's free pages to the OS (glibc only; a no-op elsewhere)."""
    with contextlib.suppress(OSError, AttributeError, TypeError):
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
