"""Which raw DHT values a node of the mesh will decode: msgpack bytes are scanned before parsing.

Installed by `swarm.dht.make_dht` in every process of the mesh (peers, trainer, clients, status).

hivemind's `MSGPackSerializer.loads` recurses in C through its ext-type hook and segfaults the DHT
process on a tuple nested a few hundred deep (2.4 KB). `scan` walks the bytes with an explicit
stack and bounds size, depth, lengths and ext types, so anything it passes decodes without error.
Two hooks use it: `GuardedMSGPackSerializer` (what hivemind's DHT protocol decodes with, including
whole dictionaries it decodes before any validator runs) and `DHTValueGuard`, a record validator
that drops a bad subkey or value before it is stored or accepted from a `find` reply.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from hivemind.dht.crypto import DHTRecord, RecordValidatorBase
from hivemind.dht.storage import DictionaryDHTValue
from hivemind.utils.serializer import MSGPackSerializer

from swarm.errors import BadRequest

logger = logging.getLogger(__name__)

TUPLE_CODE = MSGPackSerializer._TUPLE_EXT_TYPE_CODE  # 0x40: hivemind packs tuples as this ext
DICTIONARY_CODE = 0x50  # hivemind.dht.storage.DictionaryDHTValue: a key's subkeys, whole


@dataclass(frozen=True)
class Limits:
    """Bounds on one msgpack document: bytes, open containers, items in one, objects in all."""

    max_bytes: int
    max_depth: int
    max_len: int
    max_objects: int


# One record. Our largest, a span record with 32 next_pings and 8 addrs, is about 3.1 KB
# (tests/test_dht_guard.py measures it): 64 KiB leaves a 21x margin; its depth is 4 (of 16).
VALUE_LIMITS = Limits(max_bytes=64 * 1024, max_depth=16, max_len=4096, max_objects=16384)
# A whole key (every subkey's record as opaque bytes), as find replies carry it: the unary cap.
DICTIONARY_LIMITS = Limits(
    max_bytes=4 * 1024 * 1024, max_depth=16, max_len=1 << 16, max_objects=1 << 19
)


class UnsafeDHTValue(BadRequest):
    """A DHT value or subkey from the network that this node refuses to decode."""


# Fixed-size tails after a header byte: nil/bool have none; ints and floats their width.
_FIXED = {0xC0: 0, 0xC2: 0, 0xC3: 0, 0xCA: 4, 0xCB: 8, 0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}
_FIXED.update({0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8})
_BIN = {0xC4: 1, 0xC5: 2, 0xC6: 4}  # bin 8/16/32: width of the length
_STR = {0xD9: 1, 0xDA: 2, 0xDB: 4}
_EXT = {0xC7: 1, 0xC8: 2, 0xC9: 4}
_FIXEXT = {0xD4: 1, 0xD5: 2, 0xD6: 4, 0xD7: 8, 0xD8: 16}
_ARRAY = {0xDC: 2, 0xDD: 4}
_MAP = {0xDE: 2, 0xDF: 4}
# What an open container frame is: its items, a map's keys and values, or one ext payload.
_LIST, _MAP_FRAME, _TUPLE_PAYLOAD, _DICT_PAYLOAD = range(4)


def _fail(why: str) -> UnsafeDHTValue:
    return UnsafeDHTValue(f"refused DHT value: {why}")


def scan(buf: bytes, limits: Limits = VALUE_LIMITS, dictionary: bool = False) -> None:
    """Raise UnsafeDHTValue unless `buf` is exactly one msgpack object that decodes within limits.

    Non-recursive (an explicit stack); no object is built. Besides size, depth and lengths it
    checks what would make hivemind's decoder raise: UTF-8 of strings, map keys (str or bin),
    tuple payloads (an array), ext types (tuples; with `dictionary`, one DictionaryDHTValue at the
    top, whose subkeys' values stay opaque bytes), trailing bytes.
    """
    if not isinstance(buf, (bytes, bytearray)):
        raise _fail(f"expected bytes, got {type(buf).__name__}")
    n = len(buf)
    if n > limits.max_bytes:
        raise _fail(f"{n} bytes, over {limits.max_bytes}")
    pos, objects = 0, 0
    # Frames of open containers: [kind, items left, end of the region they must lie in].
    stack: list[list[int]] = []
    end = n  # the innermost region: the buffer, or an ext payload
    pending = 1  # objects still to read at the top level
    while True:
        if stack:
            frame = stack[-1]
            if frame[1] == 0:
                stack.pop()
                if frame[0] in (_TUPLE_PAYLOAD, _DICT_PAYLOAD):
                    if pos != frame[2]:
                        raise _fail("bytes left over inside an ext payload")
                    end = stack[-1][2] if stack else n
                continue
            frame[1] -= 1
            kind = frame[0]
            is_key = kind == _MAP_FRAME and frame[1] % 2 == 1  # keys come first of each pair
        elif pending:
            pending, kind, is_key = 0, _LIST, False
        else:
            break
        if pos >= end:
            raise _fail("truncated")
        objects += 1
        if objects > limits.max_objects:
            raise _fail(f"more than {limits.max_objects} objects")
        b = buf[pos]
        pos += 1
        if kind == _TUPLE_PAYLOAD and not (0x90 <= b <= 0x9F or b in _ARRAY):
            raise _fail("a tuple whose payload is not an array")
        if is_key and not (0xA0 <= b <= 0xBF or b in _STR or b in _BIN):
            raise _fail("a map key that is not a string")
        length = -1
        if b <= 0x7F or b >= 0xE0:  # fixints
            continue
        if b in _FIXED:
            pos += _FIXED[b]
        elif 0xA0 <= b <= 0xBF or b in _STR:
            length = b & 0x1F if b <= 0xBF else _uint(buf, pos, _STR[b], end)
            pos += 0 if b <= 0xBF else _STR[b]
            if pos + length > end:
                raise _fail("truncated string")
            try:
                bytes(buf[pos : pos + length]).decode("utf-8")
            except UnicodeDecodeError:
                raise _fail("a string that is not UTF-8") from None
            pos += length
        elif b in _BIN:
            length = _uint(buf, pos, _BIN[b], end)
            pos += _BIN[b] + length
        elif 0x90 <= b <= 0x9F or b in _ARRAY or 0x80 <= b <= 0x8F or b in _MAP:
            is_map = 0x80 <= b <= 0x8F or b in _MAP
            if b in _ARRAY or b in _MAP:
                width = (_ARRAY if b in _ARRAY else _MAP)[b]
                length = _uint(buf, pos, width, end)
                pos += width
            else:
                length = b & 0x0F
            if length > limits.max_len:
                raise _fail(f"a container of {length} items, over {limits.max_len}")
            items = 2 * length if is_map else length
            if items > end - pos:  # each item takes at least a byte
                raise _fail(f"{length} items declared in {end - pos} bytes")
            _push(stack, [_MAP_FRAME if is_map else _LIST, items, end], limits)
        elif b in _EXT or b in _FIXEXT:
            if b in _EXT:
                length = _uint(buf, pos, _EXT[b], end)
                pos += _EXT[b]
            else:
                length = _FIXEXT[b]
            if pos + 1 + length > end:
                raise _fail("truncated ext")
            code = buf[pos]
            pos += 1
            if code == TUPLE_CODE:
                frame_kind = _TUPLE_PAYLOAD
            elif code == DICTIONARY_CODE and dictionary and objects == 1:
                frame_kind = _DICT_PAYLOAD
            else:
                raise _fail(f"ext type {code:#x} where only tuples are allowed")
            end = pos + length
            _push(stack, [frame_kind, 1, end], limits)
        else:  # 0xc1, never used
            raise _fail(f"invalid msgpack byte {b:#x}")
        if pos > end:
            raise _fail("truncated")
    if pos != n:
        raise _fail(f"{n - pos} bytes after the value")


def _uint(buf: bytes, pos: int, width: int, end: int) -> int:
    if pos + width > end:
        raise _fail("truncated length")
    return int.from_bytes(buf[pos : pos + width], "big")


def _push(stack: list[list[int]], frame: list[int], limits: Limits) -> None:
    if len(stack) >= limits.max_depth:
        raise _fail(f"nested deeper than {limits.max_depth}")
    stack.append(frame)


def _is_time(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)


def check_dictionary(value: DictionaryDHTValue) -> None:
    """What hivemind's search later compares and stores: expirations, maxsize, bytes values."""
    maxsize = value.maxsize
    if not (
        maxsize == float("inf") or (isinstance(maxsize, int) and not isinstance(maxsize, bool))
    ):
        raise _fail(f"a dictionary's maxsize {maxsize!r}")
    if not _is_time(value.latest_expiration_time):
        raise _fail("a dictionary's expiration is not a number")
    with value.freeze():  # as hivemind reads it: expired subkeys would be dropped on access
        for subkey, (item, expiration) in value.items():
            if not isinstance(item, bytes) or not _is_time(expiration):
                raise _fail(f"subkey {subkey!r}: a value not bytes or an expiration not a number")


class GuardedMSGPackSerializer(MSGPackSerializer):
    """hivemind's DHT serializer, which scans every buffer before decoding it."""

    @classmethod
    def loads(cls, buf: bytes) -> object:
        dictionary = _is_dictionary(buf)
        scan(buf, DICTIONARY_LIMITS if dictionary else VALUE_LIMITS, dictionary=dictionary)
        try:
            value = super().loads(buf)
        except Exception as e:  # the scan should have caught it; refuse all the same
            raise _fail(f"{type(e).__name__}: {e}") from e
        if isinstance(value, DictionaryDHTValue):
            check_dictionary(value)
        return value


def _is_dictionary(buf: bytes) -> bool:
    """Whether `buf` starts as a DictionaryDHTValue ext (0xd4-0xd8 fixext, or 0xc7-0xc9 ext)."""
    if not isinstance(buf, (bytes, bytearray)) or len(buf) < 2:
        return False
    head = buf[0]
    at = {0xD4: 1, 0xD5: 1, 0xD6: 1, 0xD7: 1, 0xD8: 1, 0xC7: 2, 0xC8: 3, 0xC9: 5}.get(head)
    return at is not None and len(buf) > at and buf[at] == DICTIONARY_CODE


class DHTValueGuard(RecordValidatorBase):
    """Refuses records whose subkey or value would not pass `scan` (logged at debug).

    It runs last among validators (lowest priority), so it sees the value as others strip it
    (a signature envelope removed): exactly the bytes hivemind will decode.
    """

    def validate(self, record: DHTRecord) -> bool:
        try:
            if not _is_time(record.expiration_time):
                raise _fail(f"expiration {record.expiration_time!r}")
            scan(record.subkey)
            scan(record.value)
        except UnsafeDHTValue as e:
            logger.debug("dropping DHT record under key %s: %s", bytes(record.key).hex(), e)
            return False
        return True

    @property
    def priority(self) -> int:
        return -1000


def install_guard() -> None:
    """Make hivemind's DHT protocol decode values from the network through the guarded serializer.

    Idempotent; call it before a DHT starts (its node runs in a forked process, which inherits
    it). Relies on hivemind 1.1.12 decoding only through `DHTProtocol.serializer`: protocol.py
    rpc_store (l.246 whole dictionaries, l.267 subkeys) and call_find (l.319); node.py
    _SearchState.finish_search (l.864, l.874, the serializer passed from the protocol at l.603);
    schema.py SchemaValidator (l.119, l.121). storage.py DictionaryDHTValue.unpackb (l.27) calls
    MSGPackSerializer.loads itself, on a payload the outer scan has covered.
    tests/test_dht_guard.py fails if hivemind's sources stop matching this list.
    """
    from hivemind.dht.protocol import DHTProtocol

    DHTProtocol.serializer = GuardedMSGPackSerializer


async def guard_active(_dht: Any, node: Any) -> bool:
    """Whether `node` (inside the DHT's process) decodes guarded: for `DHT.run_coroutine`."""
    validator = node.protocol.record_validator
    validators = getattr(validator, "_validators", [validator])
    return node.protocol.serializer is GuardedMSGPackSerializer and any(
        isinstance(v, DHTValueGuard) for v in validators
    )
