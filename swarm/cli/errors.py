"""One clear line for what a user can get wrong: known errors print `PROG: error: ...`, no stack.

Used by the `swarm-peer`, `swarm-train` and `swarm-generate` CLIs (`run_main`).
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Callable

from swarm.errors import SwarmError
from swarm.net import MADDR_HINT

logger = logging.getLogger(__name__)

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


def describe(error: BaseException) -> str | None:
    """The one-line message for an error a user can cause; None for a bug (keep the traceback)."""
    from hivemind.p2p import P2PDaemonError

    if isinstance(error, P2PDaemonError):
        text = str(error)
        for pattern, message in _DAEMON_ERRORS:
            if pattern in text:
                return message
        # "Daemon failed to start: 2026/12/02 00:56:45 <why>": keep the why.
        return "the P2P daemon failed to start: " + re.sub(r"^.*?\d\d:\d\d:\d\d ", "", text)
    if isinstance(error, (SwarmError, ValueError, OSError)):
        return " ".join(str(error).split()) or type(error).__name__
    return None


def run_main(prog: str, body: Callable[[], int]) -> int:
    """Run a CLI's body; a known error becomes one stderr line and exit status 1 (130: Ctrl-C)."""
    try:
        return body()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        message = describe(e)
        if message is None:
            raise
        logger.debug("%s failed", prog, exc_info=True)  # the traceback, with --verbose
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 1
