"""Temporary folders of the simulations and benchmarks, removed however the run ends.

Used by churn_real (and its calibration), bench_training, bench_peer and demo_swarm's LocalSwarm
(so bench_inference too): logs, tiny models and caches never outlive the command.
"""

from __future__ import annotations

import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def raise_interrupt(signum: int, frame: object) -> None:
    """A signal handler that unwinds like Ctrl-C, so that `finally` blocks stop what runs."""
    raise KeyboardInterrupt


@contextmanager
def scratch_dir(prefix: str, keep: str | Path | None = None) -> Iterator[Path]:
    """A fresh temporary folder, removed when the block exits (an exception or Ctrl-C too).

    keep: a folder the user asked for (e.g. --workdir): created if missing, yielded and kept.
    While the block runs, SIGTERM unwinds like Ctrl-C (in the main thread), so that the block's
    own cleanup (stopping processes) runs before the folder is removed.
    """
    if keep is not None:
        path = Path(keep)
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    path = Path(tempfile.mkdtemp(prefix=prefix))
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, raise_interrupt) if main else None
    try:
        yield path
    finally:
        if main:  # None: the handler was not set from Python, i.e. the default
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
        shutil.rmtree(path, ignore_errors=True)
