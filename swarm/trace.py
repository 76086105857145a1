"""Step tracing: when SWARM_MESH_TRACE names a folder, a process notes when each stage of an
inference step happens there (`simulations.bench_peer --trace` reads them into a timeline).

Off by default: event() is then one test of a module global. On, events are kept in memory
(name, time.perf_counter(): CLOCK_MONOTONIC, one clock for every process of the machine) and
written to FOLDER/trace-PID.txt, one "name seconds" line each, when flush() is called (a peer
calls it once a step's reply is sent, off the step's critical path) and at exit.
"""

from __future__ import annotations

import atexit
import os
import threading
import time
from pathlib import Path

ENV = "SWARM_MESH_TRACE"

_folder = os.environ.get(ENV) or None
_events: list[tuple[str, float]] = []
_lock = threading.Lock()  # the compute thread notes events too


def enabled() -> bool:
    return _folder is not None


def event(name: str) -> None:
    """Note that stage `name` happens now (nothing when tracing is off)."""
    if _folder is not None:
        _events.append((name, time.perf_counter()))  # list.append is atomic


def flush() -> None:
    """Append the events noted so far to this process's trace file."""
    if _folder is None or not _events:
        return
    with _lock:
        taken = _events[:]
        del _events[: len(taken)]
        path = Path(_folder) / f"trace-{os.getpid()}.txt"
        with open(path, "a", encoding="utf-8") as f:
            f.writelines(f"{name} {t:.6f}\n" for name, t in taken)


def read(path: Path) -> list[tuple[str, float]]:
    """The events of one trace file, in the order noted."""
    events = []
    for line in path.read_text(encoding="utf-8").splitlines():
        name, _, t = line.partition(" ")
        events.append((name, float(t)))
    return events


def read_file(folder: Path, pid: int) -> list[tuple[str, float]]:
    """The events process `pid` wrote to `folder` (none if it wrote nothing)."""
    path = Path(folder) / f"trace-{pid}.txt"
    return read(path) if path.exists() else []


atexit.register(flush)
