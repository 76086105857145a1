"""Server-to-server push: a peer sends its step output straight to the session's next hop.

Used by `swarm.peer.handler.PeerHandler`: one `Pushes` per handler holds each session's inbox.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import torch
from hivemind.p2p import P2P, PeerID

from proto import peer_pb2
from swarm.errors import BadRequest, PeerUnavailable, SessionExpired
from swarm.link import Link
from swarm.loops import within
from swarm.peer import wire

logger = logging.getLogger(__name__)

# A pushed step waits in its session's inbox (bounded) for its step message; a push that is
# not acknowledged within PUSH_TIMEOUT (plus the emulated link's round trip) is reported to
# the client at once, which re-routes the next hop.
PUSH_INBOX = 4
PUSH_TIMEOUT = 2.0


class Pushes:
    """Each open session's inbox of pushed inputs and the one peer allowed to push into it.

    decode(msg, what, batch_size): the handler's checked decode of an activation.
    stub(p2p, peer): the servicer stub whose rpc_push reaches `peer`.
    """

    def __init__(self, link: Link, decode: Callable[..., torch.Tensor], stub, wait: float):
        self.link, self._decode, self._stub, self.wait = link, decode, stub, wait
        self.p2p: P2P | None = None  # set when the handlers are registered
        self._inbox: dict[str, asyncio.Queue] = {}
        self._prev: dict[str, str] = {}
        self._batch: dict[str, int] = {}

    def open(self, session_id: str, prev_peer: str, batch_size: int) -> None:
        self._inbox[session_id] = asyncio.Queue(PUSH_INBOX)
        self._prev[session_id] = prev_peer
        self._batch[session_id] = batch_size

    def set_prev(self, session_id: str, prev_peer: str) -> None:
        self._prev[session_id] = prev_peer

    def free(self, session_id: str) -> None:
        self._inbox.pop(session_id, None)
        self._prev.pop(session_id, None)
        self._batch.pop(session_id, None)

    def accept(self, request: peer_pb2.PushStep, sender: PeerID, client=None) -> None:
        """Queue a previous hop's output for its session, if `sender` is that hop or `client`, the
        session's opener."""
        inbox = self._inbox.get(request.session_id)
        if inbox is None:
            raise SessionExpired(f"unknown session {request.session_id[:64]!r}: nothing to push to")
        prev = self._prev.get(request.session_id, "")
        # Its client may push too: a failover's replacement answered the client, not us.
        owner = client is not None and client == sender
        if not owner and (not prev or prev != sender.to_base58()):
            raise BadRequest(
                f"peer {sender} is not the previous hop of session {request.session_id}: "
                "only the peer its client declared (or the client) may push into it"
            )
        batch = self._batch[request.session_id]
        hidden = self._decode(request.hidden, "pushed hidden", batch_size=batch)
        if inbox.full():
            raise BadRequest(f"session {request.session_id} already holds {PUSH_INBOX} pushes")
        inbox.put_nowait((request.position, hidden))

    async def input(self, session_id: str, step: peer_pb2.InferenceStep) -> torch.Tensor:
        """The input the previous hop pushed for this step (bounded wait)."""
        inbox = self._inbox[session_id]
        try:
            async with asyncio.timeout(self.wait):
                position, hidden = await inbox.get()
        except TimeoutError:
            raise PeerUnavailable(f"the previous hop pushed nothing in {self.wait:.0f} s") from None
        if position != step.position or hidden.shape[1] != step.length:
            raise BadRequest(
                f"the pushed input holds positions {position}..{position + hidden.shape[1]}, "
                f"the step asked for {step.position}..{step.position + step.length}"
            )
        return hidden

    def start(self, peer: PeerID, msg: peer_pb2.PushStep) -> asyncio.Future:
        """Send `msg` to `peer` in the background; failure() tells how it went."""
        return asyncio.ensure_future(self._push(peer, msg))

    async def _push(self, peer: PeerID, msg: peer_pb2.PushStep) -> None:
        if self.p2p is None:
            raise PeerUnavailable("this peer has no P2P to push through")
        await self.link.send(msg.ByteSize())
        timeout = PUSH_TIMEOUT + 2 * self.link.delay
        reply = await self._stub(self.p2p, peer).rpc_push(msg, timeout=timeout)
        if reply.HasField("error"):
            raise wire.error_from_wire(reply.error, str(peer))

    async def failure(self, push: asyncio.Future | None) -> peer_pb2.Error | None:
        """None if there was no push or it went through; else the error for the client."""
        if push is None:
            return None
        try:
            await within(push, PUSH_TIMEOUT + 4 * self.link.delay)
        except Exception as e:
            logger.info("push to the next hop failed: %r", e)
            if not isinstance(e, (BadRequest, SessionExpired, PeerUnavailable)):
                e = PeerUnavailable(f"the next hop did not take the push: {type(e).__name__}: {e}")
            return wire.error_to_wire(e)
        return None
