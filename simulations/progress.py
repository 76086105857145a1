"""A heartbeat on stderr for long runs: the current status, repeated every few seconds.

Used by every entry point of simulations/ (churn, churn_real, bench_*, demo, demo_swarm), so that
none stays silent for more than 10 s while it waits for peers, trains or measures.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from types import TracebackType

EVERY_S = 10.0


class Progress:
    """Prints `[HH:MM:SS] name: status` on stderr on each `update`, and again while nothing changes.

    name: who speaks (e.g. "bench_training"). every: the longest silence, in seconds.
    status: the text to repeat, or a function called at each repeat (for live counters).
    The repeat runs in a daemon thread that writes with os.write: it takes no lock that a
    forked child (hivemind's DHT process) could inherit held.
    """

    def __init__(self, name: str, every: float = EVERY_S) -> None:
        self.name, self.every = name, every
        self._status: str | Callable[[], str] = "starting"
        self._since = time.monotonic()  # when the current status was set
        self._repeat = True
        self._last = 0.0  # when anything was last printed
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def update(self, status: str | Callable[[], str], repeat: bool = True) -> None:
        """Set the status and print it now; repeat=False: print it once only (the work that
        follows speaks for itself, e.g. streamed text)."""
        self._status, self._since, self._repeat = status, time.monotonic(), repeat
        self._print("")

    def _print(self, suffix: str) -> None:
        try:
            text = self._status() if callable(self._status) else self._status
        except Exception as e:  # a counter read mid-update: say so and keep beating
            text = f"(status unavailable: {type(e).__name__})"
        line = f"[{time.strftime('%H:%M:%S')}] {self.name}: {text}{suffix}\n"
        self._last = time.monotonic()
        os.write(2, line.encode(errors="replace"))

    def _beat(self) -> None:
        while not self._stop.wait(min(1.0, self.every / 4)):
            now = time.monotonic()
            if self._repeat and now - self._last >= self.every:
                self._print(f" ({now - self._since:.0f} s)")

    def start(self) -> Progress:
        """Start repeating (a thread: start it after forking hivemind's DHT process if you can)."""
        if self._thread is None:
            self._last = time.monotonic()
            self._thread = threading.Thread(target=self._beat, name="progress", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)

    def __enter__(self) -> Progress:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
