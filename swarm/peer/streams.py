"""Bounded protobuf streams over hivemind P2P: a message's length is checked before it is read.

Used by the peer's handlers (`swarm.peer.handler`) instead of hivemind's stream registration,
whose reader takes any 8-byte length prefix and then buffers that many bytes (DESIGN: streams).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from google.protobuf.message import DecodeError, Message
from hivemind.p2p import P2P, P2PContext, P2PHandlerError, PeerID
from hivemind.proto.p2pd_pb2 import RPCError

from swarm.errors import BadRequest

logger = logging.getLogger(__name__)

MAX_PREFETCH = 5  # messages read ahead of the handler (hivemind's default): bounds a stream's RAM
CLOSE_WAIT = 5.0  # how long the handler may still reply after we stopped reading its stream
# Closing a stream the caller still writes to resets it, and our last reply is lost with it:
# after a refusal we wait up to LINGER_SECONDS for the caller to close, discarding (never
# keeping) at most LINGER_BYTES of what it still sends, then leaving the rest unread.
LINGER_BYTES = 1 << 20
LINGER_SECONDS = 2.0


class MessageTooLarge(BadRequest):
    """A stream message whose length prefix exceeds what the handler accepts; never read."""


StreamHandler = Callable[[AsyncIterator[Message], P2PContext], AsyncIterator[Message]]


def stream_server(
    name: str,
    handler: StreamHandler,
    input_type: type[Message],
    max_message_bytes: int,
    local_id: PeerID,
):
    """A connection handler (info, reader, writer) serving `handler` (requests stream in,
    replies stream out) as hivemind's streams do, over any transport with asyncio's reader and
    writer: libp2p's (P2P.add_binary_stream_handler) or the direct channel's.

    The wire format is hivemind's (marker byte, 8-byte length, protobuf), so hivemind stubs call
    it unchanged. A message longer than `max_message_bytes`, or one that does not parse, reaches
    the handler as a BadRequest raised by its request iterator; the stream is read no further
    and is closed once the handler returns (or after CLOSE_WAIT s) and the caller has had
    time to read the reply (LINGER_*).
    """

    async def handle(info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        context = P2PContext(handle_name=name, local_id=local_id, remote_id=info.peer_id)
        queue: asyncio.Queue = asyncio.Queue(MAX_PREFETCH)

        async def requests() -> AsyncIterator[Message]:
            while (item := await queue.get()) is not None:
                if isinstance(item, Exception):
                    raise item
                yield item

        async def process() -> None:
            try:
                async for reply in handler(requests(), context):
                    try:
                        await send(reply, writer)
                    except Exception:  # the caller closed or broke the connection
                        logger.debug("could not send a reply on %s", name, exc_info=True)
                        break
            except Exception as e:
                logger.warning("stream handler %s failed", name, exc_info=True)
                with contextlib.suppress(Exception):
                    await send(RPCError(message=str(e)), writer)

        with contextlib.closing(writer):
            processing = asyncio.create_task(process())
            receiving: asyncio.Task | None = None
            ended = False  # the caller's end of stream came: nothing more will arrive
            try:
                while True:
                    receiving = asyncio.create_task(receive(reader, input_type, max_message_bytes))
                    await asyncio.wait({processing, receiving}, return_when=asyncio.FIRST_COMPLETED)
                    if processing.done():
                        receiving.cancel()
                        if not ended:  # the handler refused mid-request: the caller still sends
                            await asyncio.wait({receiving})  # it must let go of the reader first
                            await _linger(reader)
                        return
                    try:
                        request = receiving.result()
                    except (asyncio.IncompleteReadError, ConnectionError):  # the caller went away
                        return
                    except BadRequest as e:  # refused: hand it over, read nothing more of it
                        await queue.put(e)
                        await asyncio.wait({processing}, timeout=CLOSE_WAIT)
                        await _linger(reader)
                        return
                    await queue.put(request)  # None: the caller's end of stream
                    ended = request is None
            except Exception:
                logger.warning("error while receiving on %s", name, exc_info=True)
            finally:  # also when cancelled (the peer shuts down): the read in flight goes too,
                processing.cancel()  # and lets go of the reader (a direct channel's next stream
                if receiving is not None:  # reads it); its failure is seen, not logged
                    receiving.cancel()
                    await asyncio.wait({receiving})
                    if not receiving.cancelled():
                        receiving.exception()

    return handle


def frame(msg: Message, error: bool = False) -> bytes:
    """A message in hivemind's stream format (marker, 8-byte length, protobuf) as one buffer."""
    data = msg.SerializeToString()
    marker = P2P.ERROR_MARKER if error else P2P.MESSAGE_MARKER
    return marker + len(data).to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER) + data


async def send(msg: Message, writer: asyncio.StreamWriter) -> None:
    """One write per message: hivemind's send_protobuf makes three, each a syscall and a wake-up
    of the daemon on the other end (the largest software cost of a decode step, profiled)."""
    writer.write(frame(msg, isinstance(msg, RPCError)))
    await writer.drain()


async def call_stream(
    p2p: P2P,
    peer: PeerID,
    name: str,
    requests: AsyncIterator[Message],
    reply_type: type[Message],
    max_message_bytes: int,
) -> AsyncIterator[Message]:
    """Open a stream to `peer`'s handler `name`: requests go out as they come, replies are read
    bounded (a reply longer than `max_message_bytes` raises MessageTooLarge, unread).

    The wire format is hivemind's, so hivemind's and our stream handlers both serve it; a
    handler's error message raises P2PHandlerError, as from hivemind's stubs.
    """
    _, reader, writer = await p2p.call_binary_stream_handler(peer, name)
    return stream_over(reader, writer, name, peer, requests, reply_type, max_message_bytes)


def stream_over(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    name: str,
    peer: PeerID,
    requests: AsyncIterator[Message],
    reply_type: type[Message],
    max_message_bytes: int,
) -> AsyncIterator[Message]:
    """call_stream's replies on a stream already open (libp2p's or the direct channel's)."""

    async def write() -> None:
        async for request in requests:
            await send(request, writer)
        await send(P2P.END_OF_STREAM, writer)

    async def read() -> AsyncIterator[Message]:
        with contextlib.closing(writer):
            writing = asyncio.create_task(write())
            try:
                while True:
                    try:
                        reply = await receive(reader, reply_type, max_message_bytes, RPCError)
                    except asyncio.IncompleteReadError:  # the peer closed the stream
                        break
                    if isinstance(reply, RPCError):
                        raise P2PHandlerError(f"handler {name} at {peer} failed: {reply.message}")
                    yield reply
            finally:
                writing.cancel()

    return read()


async def receive(
    reader: asyncio.StreamReader,
    msg_type: type[Message],
    max_bytes: int,
    error_type: type[Message] | None = None,
) -> Message | None:
    """One message from the stream, length checked first. An error-marked message: None (a
    caller's end of stream), or parsed as `error_type` if given (a handler's failure)."""
    marker = await reader.readexactly(1)
    if marker not in (P2P.MESSAGE_MARKER, P2P.ERROR_MARKER):
        raise BadRequest(f"invalid stream message marker {marker!r}")
    length = int.from_bytes(await reader.readexactly(P2P.HEADER_LEN), P2P.BYTEORDER)
    if length > max_bytes:
        raise MessageTooLarge(
            f"a stream message of {length} bytes exceeds this peer's limit of {max_bytes}: "
            "split requests into parts (swarm.peer.wire.split)"
        )
    data = await reader.readexactly(length)
    if marker == P2P.ERROR_MARKER:
        if error_type is None:
            return None  # hivemind ends a request stream with an (empty) error message
        msg_type = error_type
    msg = msg_type()
    try:
        msg.ParseFromString(data)
    except (DecodeError, RuntimeWarning, ValueError) as e:
        raise BadRequest(f"malformed {msg_type.__name__} stream message: {e}") from None
    return msg


async def _linger(reader: asyncio.StreamReader) -> None:
    """Wait (bounded) for the caller to close, so it can read our reply before the stream goes."""
    left = LINGER_BYTES
    with contextlib.suppress(Exception):
        async with asyncio.timeout(LINGER_SECONDS):
            while left > 0:
                data = await reader.read(min(1 << 16, left))
                if not data:
                    return  # the caller closed
                left -= len(data)
            await asyncio.sleep(LINGER_SECONDS)  # it writes on: let it stall, unread, till then
