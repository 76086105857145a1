"""P2P daemon start-up in words: is our port free, are the multiaddrs real, what did p2pd mean?

Used by `swarm.peer.server.Peer`, the trainer, `swarm-peer status` and the client before their DHT
starts (so a bad address is named, with a hint), and by `swarm.cli.console` for p2pd's errors.
"""

from __future__ import annotations

import re
import socket

from swarm.errors import AddressInUse

MADDR_HINT = "a multiaddr looks like /ip4/127.0.0.1/tcp/31337/p2p/12D3KooW... (what a peer prints)"


def check_initial_peers(maddrs: list[str]) -> None:
    """Raise ValueError naming the first of `maddrs` that is no full peer multiaddr (/p2p/ID)."""
    from hivemind.utils.multiaddr import Multiaddr

    for maddr in maddrs:
        try:
            names = [p.name for p in Multiaddr(maddr).protocols()]
        except ValueError as e:
            why = re.sub(r"^Invalid MultiAddr '.*?'\s*:?\s*", "", str(e))
            message = f"--initial-peers {maddr!r} is not a multiaddr ({why}); {MADDR_HINT}"
            raise ValueError(message) from None
        if "p2p" not in names:
            raise ValueError(f"--initial-peers {maddr!r} must end in /p2p/PEER_ID; {MADDR_HINT}")


def ensure_port_free(host: str, port: int, flag: str = "--port") -> None:
    """Raise AddressInUse if `port` on `host` is taken; port 0 (any) always passes.

    p2pd binds with SO_REUSEPORT, so a second daemon would share a busy port and split its
    connections with the first. A plain bind (SO_REUSEADDR only, so TIME_WAIT of our own last
    run passes) fails on any live listener, theirs included.
    """
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            raise AddressInUse(
                f"port {port} on {host} is in use (another peer?): pick another {flag}, "
                f"or {flag} 0 for any free one"
            ) from e


# p2pd's startup failures, as its message says them, and what to tell the user instead.
_DAEMON_ERRORS = (
    (
        "failed to connect to bootstrap peers",
        "could not reach any of --initial-peers: is the peer running, and is the address the one "
        "it printed?",
    ),
    ("failed to parse multiaddr", "--initial-peers: not a multiaddr; " + MADDR_HINT),
    (
        "invalid p2p multiaddr",
        "--initial-peers: the multiaddr must end in /p2p/PEER_ID; " + MADDR_HINT,
    ),
)


def daemon_error_message(error: Exception) -> str:
    """What a P2PDaemonError from a DHT's start means, in words a user can act on."""
    text = str(error)
    for pattern, message in _DAEMON_ERRORS:
        if pattern in text:
            return message
    # "Daemon failed to start: 2026/12/02 00:56:45 <why>": keep the why.
    return "the P2P daemon failed to start: " + re.sub(r"^.*?\d\d:\d\d:\d\d ", "", text)
