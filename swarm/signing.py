"""Signed DHT records: a record whose subkey names a peer id must be signed by that peer's key.

`swarm.dht.make_dht` installs `PeerSignatureValidator` in every DHT node of the mesh; readers in
`swarm.peer.dht_view` and `swarm.training.progress` accept records only under peer-id subkeys.

The owner of a string subkey is the text after its last '|' ('QmPeer' or 'model|QmPeer'). When
the owner is a libp2p peer id, the stored value is an envelope: the owner's RSA public key, a
signature over (key, subkey, value, expiration) and the value. Every node checks that the key
hashes to the owner's peer id and the signature holds before it stores or returns the record.
Other subkeys (hivemind's own are bytes) pass unchecked, so readers must not trust them.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import os
import shutil
import struct
import tempfile
from collections import OrderedDict

import base58
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.proto import crypto_pb2

MAGIC = b"SMs1"  # envelope version 1: MAGIC, u16 key length, key, u16 sig length, sig, value
_CONTEXT = b"swarm-mesh signed record v1\0"  # what a signature is for: nothing else signs this
MAX_KEY_BYTES = 1024  # an RSA-4096 SubjectPublicKeyInfo is 550 bytes
MAX_SIG_BYTES = 1024
MAX_SUBKEY_BYTES = 1024
_STR_HEADS = frozenset(range(0xA0, 0xC0)) | {0xD9, 0xDA, 0xDB}  # msgpack str headers
_CACHE_SIZE = 4096  # verified records remembered (a record is re-read every announce period)


def is_peer_id(text: object) -> bool:
    """True if `text` is a base58 libp2p peer id of an RSA key (sha2-256 multihash, 'Qm...')."""
    if not isinstance(text, str) or len(text) != 46 or not text.startswith("Qm"):
        return False
    return _decodes_as_peer_id(text)


@functools.lru_cache(maxsize=4096)  # base58 is pure Python; a swarm has few peer ids
def _decodes_as_peer_id(text: str) -> bool:
    try:
        raw = base58.b58decode(text)
    except ValueError:
        return False
    return len(raw) == 34 and raw[:2] == b"\x12\x20"


def owner_of(subkey: object) -> str | None:
    """The peer that must sign records under `subkey`, or None if the subkey is unprotected."""
    if not isinstance(subkey, str):
        return None
    owner = subkey.rsplit("|", 1)[-1]
    return owner if is_peer_id(owner) else None


def peer_id_of(public_der: bytes) -> bytes:
    """libp2p's peer id (raw multihash) of an RSA public key in DER SubjectPublicKeyInfo."""
    encoded = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=public_der).SerializeToString()
    return b"\x12\x20" + hashlib.sha256(encoded).digest()


def load_identity(path: str) -> bytes:
    """The DER private key inside a libp2p identity file (as `P2P.generate_identity` writes)."""
    with open(path, "rb") as f:
        proto = crypto_pb2.PrivateKey.FromString(f.read())
    if proto.key_type != crypto_pb2.RSA:
        raise ValueError(f"{path}: only RSA identities can sign DHT records")
    return proto.data


_FRESH: set[str] = set()  # identity files fresh_identity made and nobody discarded yet


def fresh_identity() -> str:
    """A new identity file in a private temporary folder, removed when this process exits.

    Callers `discard_identity` it once p2pd has read it (a killed process leaves no key behind).
    """
    from hivemind.p2p import P2P

    folder = tempfile.mkdtemp(prefix="swarm-identity-")  # mode 0700
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    path = os.path.join(folder, "identity.key")
    P2P.generate_identity(path)
    _FRESH.add(path)
    return path


def discard_identity(path: str | None) -> None:
    """Remove an identity file `fresh_identity` made (others, the user's, are kept)."""
    if path in _FRESH:
        _FRESH.discard(path)
        shutil.rmtree(os.path.dirname(path), ignore_errors=True)


def _parse_str(data: bytes) -> str | None:
    """A msgpack-encoded str, decoded without msgpack (untrusted bytes); None if not one str.

    Raises ValueError for a str header whose length does not match or bad UTF-8.
    """
    if not data:
        return None
    head = data[0]
    if 0xA0 <= head <= 0xBF:
        start, length = 1, head & 0x1F
    elif head in (0xD9, 0xDA, 0xDB) and len(data) >= 1 + (1 << (head - 0xD9)):
        width = 1 << (head - 0xD9)
        start, length = 1 + width, int.from_bytes(data[1 : 1 + width], "big")
    else:
        return None
    if len(data) != start + length:
        raise ValueError("malformed string subkey")
    return data[start:].decode("utf-8")  # UnicodeDecodeError is a ValueError


def _signed_bytes(record: DHTRecord) -> bytes:
    parts = [_CONTEXT]
    for field in (record.key, record.subkey, record.value):
        parts += [struct.pack(">I", len(field)), field]
    parts.append(struct.pack(">d", record.expiration_time))
    return b"".join(parts)


def open_envelope(value: bytes) -> tuple[bytes, bytes, bytes]:
    """(public key DER, signature, inner value) of an envelope; ValueError if malformed."""
    if len(value) < len(MAGIC) + 4 or not value.startswith(MAGIC):
        raise ValueError("not a signed value")
    at = len(MAGIC)
    (key_len,) = struct.unpack_from(">H", value, at)
    public_der = value[at + 2 : at + 2 + key_len]
    at += 2 + key_len
    if key_len > MAX_KEY_BYTES or len(public_der) != key_len or len(value) < at + 2:
        raise ValueError("truncated public key")
    (sig_len,) = struct.unpack_from(">H", value, at)
    signature = value[at + 2 : at + 2 + sig_len]
    if sig_len > MAX_SIG_BYTES or len(signature) != sig_len:
        raise ValueError("truncated signature")
    return public_der, signature, value[at + 2 + sig_len :]


def seal(private_der: bytes, record: DHTRecord) -> bytes:
    """`record.value` wrapped in an envelope signed with the DER RSA `private_der`."""
    key = serialization.load_der_private_key(private_der, password=None)
    return _seal(key, record)


def _seal(key: rsa.RSAPrivateKey, record: DHTRecord) -> bytes:
    public_der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    signature = key.sign(_signed_bytes(record), padding.PKCS1v15(), hashes.SHA256())
    head = MAGIC + struct.pack(">H", len(public_der)) + public_der
    return head + struct.pack(">H", len(signature)) + signature + record.value


class PeerSignatureValidator(RecordValidatorBase):
    """Signs this node's records under its own peer id; refuses others' unless their owner signed.

    private_der: this node's RSA key (DER, from its identity file), or None for a node that only
    reads (it can then store nothing under peer-id subkeys).
    """

    def __init__(self, private_der: bytes | None = None):
        self._private_der = private_der
        self._key: rsa.RSAPrivateKey | None = None
        self.peer_id = ""  # base58 id of the key, "" without one
        if private_der is not None:
            self._key = serialization.load_der_private_key(private_der, password=None)
            public = self._key.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            self.peer_id = base58.b58encode(peer_id_of(public)).decode()
        self._verified: OrderedDict[bytes, None] = OrderedDict()

    def __getstate__(self) -> dict:  # a spawned DHT process gets the key bytes, not the object
        return {"private_der": self._private_der}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["private_der"])

    @staticmethod
    def _owner(record: DHTRecord) -> str | None:
        """The subkey's owner; None: unprotected; "": a string too long to judge (refused)."""
        if len(record.subkey) > MAX_SUBKEY_BYTES:
            return "" if record.subkey[0] in _STR_HEADS else None
        return owner_of(_parse_str(record.subkey))

    def sign_value(self, record: DHTRecord) -> bytes:
        if self._key is None or not self.peer_id:
            return record.value
        try:
            owner = self._owner(record)
        except ValueError:
            return record.value
        return _seal(self._key, record) if owner == self.peer_id else record.value

    def validate(self, record: DHTRecord) -> bool:
        try:
            owner = self._owner(record)
        except ValueError:
            return False  # a malformed string subkey: hivemind would store it under some str
        if owner is None:
            return True  # not ours to judge: readers of the mesh ignore unowned subkeys
        if not owner:
            return False
        digest = hashlib.sha256(_signed_bytes(record)).digest()
        if digest in self._verified:
            self._verified.move_to_end(digest)
            return True
        try:
            public_der, signature, inner = open_envelope(record.value)
            if base58.b58encode(peer_id_of(public_der)).decode() != owner:
                return False  # signed, but by somebody else's key
            public = serialization.load_der_public_key(public_der)
            if not isinstance(public, rsa.RSAPublicKey):
                return False
            signed = DHTRecord(record.key, record.subkey, inner, record.expiration_time)
            public.verify(signature, _signed_bytes(signed), padding.PKCS1v15(), hashes.SHA256())
        except (ValueError, InvalidSignature):
            return False
        self._verified[digest] = None
        if len(self._verified) > _CACHE_SIZE:
            self._verified.popitem(last=False)
        return True

    def strip_value(self, record: DHTRecord) -> bytes:
        try:
            if not self._owner(record):
                return record.value
            return open_envelope(record.value)[2]
        except ValueError:
            return record.value

    @property
    def priority(self) -> int:
        return 20  # validated first and signed last: other validators see the inner value

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return False
