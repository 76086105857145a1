"""One thread per process computes in parallel: the others run torch serially.

Used by the event loops (swarm.loops), the peer (its loop thread, its loading) and the client's
background loop. Why: torch's CPU ops run on OpenMP (libgomp in the Linux wheels). Each thread
that starts a parallel op becomes the master of its own team of OpenMP threads, kept until that
thread exits; once a process holds more OpenMP threads than there are CPUs, libgomp cuts the spin
of every waiting thread to 100 turns, which is as slow as OMP_WAIT_POLICY=PASSIVE. Measured on 2
cores (SmolLM2 fp32 decode on a worker thread, GOMP_SPINCOUNT=10000): 15.3 tok/s once another
thread had run one parallel op, 25.5 when that thread ran serially (`serial_torch`), 15.5 under
PASSIVE.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import functools
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

logger = logging.getLogger(__name__)

T = TypeVar("T")


OPENMP_RUNTIMES = ("libgomp", "libiomp", "libomp")


def _loaded_openmp() -> list[str]:
    """Paths of the OpenMP runtimes mapped into this process (Linux; none elsewhere)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return []
    paths = {line.split(None, 5)[-1] for line in maps.splitlines()}
    return sorted(p for p in paths if Path(p).name.startswith(OPENMP_RUNTIMES))


@functools.cache
def _openmp() -> ctypes.CDLL | None:
    """The OpenMP runtime torch runs on, as loaded in this process (None if none is found)."""
    lib = Path(torch.__file__).parent / "lib"
    bundled = [str(p) for name in OPENMP_RUNTIMES for p in sorted(lib.glob(f"{name}*"))]
    for path in _loaded_openmp() + bundled:
        with contextlib.suppress(OSError):
            return ctypes.CDLL(path)
    logger.debug("no OpenMP runtime found in this process: threads keep their parallelism")
    return None


def serial_torch() -> None:
    """Run torch's CPU ops serially in the calling thread (other threads keep their own count).

    torch sets a thread's OpenMP team size on that thread's first parallel op; it is read here
    first, so the 1 set after it stays. Call it at the start of a thread that must not compute.
    """
    set_threads = getattr(_openmp(), "omp_set_num_threads", None)
    if set_threads is None:
        return
    torch.get_num_threads()  # torch's once-per-thread setup of the team size, done now
    set_threads(1)


def serial_executor(max_workers: int | None = None) -> concurrent.futures.ThreadPoolExecutor:
    """A thread pool whose threads run torch serially: an event loop's default executor, so
    `asyncio.to_thread` never starts an OpenMP team (DHT calls, encodes, file reads go there)."""
    return concurrent.futures.ThreadPoolExecutor(
        max_workers, thread_name_prefix="serial-torch", initializer=serial_torch
    )


async def in_own_thread(fn: Callable[[], T], name: str = "swarm-load") -> T:
    """`fn()` on a new thread that may compute in parallel, and exits after: its OpenMP team
    goes with it, so the process is back to one team once `fn` returns (loading, measuring)."""
    done: concurrent.futures.Future = concurrent.futures.Future()

    def main() -> None:
        try:
            done.set_result(fn())
        except BaseException as e:  # handed to the awaiting task, raised there
            done.set_exception(e)

    threading.Thread(target=main, name=name, daemon=True).start()
    return await asyncio.wrap_future(done)
