"""Typed errors of the mesh, each with a message a user can act on.

Raised by the model loaders, the peer's handlers and the clients; sent over the wire by name.
"""


class SwarmError(Exception):
    """Base of every error the mesh raises on purpose."""


class BadRequest(SwarmError, ValueError):
    """The caller sent something the peer or model cannot accept (shape, dtype, range, size)."""


class CheckpointError(SwarmError):
    """A checkpoint is missing, corrupt, or of an architecture we do not support."""


class CacheFull(SwarmError):
    """The peer's attention-cache budget cannot hold the requested session."""


class PeerUnavailable(SwarmError):
    """A peer did not answer in time, refused, or went away."""


class PeerTimeout(PeerUnavailable):
    """A peer did not answer within the call's timeout: it may be dead, or alive but slow."""


class SessionExpired(SwarmError):
    """An inference session is unknown to the peer (closed, timed out, or never opened)."""


class AdapterMissing(SwarmError):
    """The peer does not hold the adapter a request names by hash: send its tensors again."""


class NoRoute(SwarmError):
    """No chain of live peers covers the blocks the client needs."""


class AddressInUse(SwarmError):
    """The TCP port a peer was told to listen on is taken (often by another peer)."""


class Unreachable(SwarmError):
    """Nobody can dial this peer, and no relay took a reservation for it."""
