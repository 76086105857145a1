"""What a CLI prints besides its output: one log format (hivemind's too) and one-line errors.

Used by the `swarm-peer`, `swarm-train` and `swarm-generate` CLIs (`setup_logging`, `run_main`).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from swarm.errors import SwarmError
from swarm.net import daemon_error_message

logger = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(verbose: bool, level: int = logging.INFO) -> None:
    """Our format on stderr for every logger; hivemind's through it, quiet below WARNING.

    Call before a DHT starts: its forked process keeps the configuration it was forked with.
    """
    from hivemind.utils.logging import use_hivemind_log_handler

    logging.basicConfig(
        level=logging.DEBUG if verbose else level, format=LOG_FORMAT, stream=sys.stderr
    )
    use_hivemind_log_handler("in_root_logger")
    logging.getLogger("hivemind").setLevel(logging.DEBUG if verbose else logging.WARNING)


def describe(error: BaseException) -> str | None:
    """The one-line message for an error a user can cause; None for a bug (keep the traceback)."""
    from hivemind.p2p import P2PDaemonError

    if isinstance(error, P2PDaemonError):
        return daemon_error_message(error)
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
