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
import os
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


def pin_team() -> list[int]:
    """Pin the calling thread's OpenMP team one thread per CPU: this thread (the team's master)
    to the first CPU this process may run on, helper i to the (i+1)-th; returns those CPUs.

    Only where the team spans every CPU allowed (as a peer's default of one thread per core
    does); [] and nothing pinned for one thread, a smaller team (cores split between peers
    with --torch-threads) or a runtime without GOMP_parallel (libgomp's, also in LLVM's and
    Intel's). Why: a peer computes in bursts after idle waits, and the kernel wakes its team's
    threads onto one CPU (wake-affine) while the other stays idle, so the two time-slice one
    core; teams of several peers on one machine thrash each other's spinning barriers. On this
    project's 2-core box, 3 SmolLM2 peers, pushed steps (alternating runs), a hop's cost over
    its blocks run locally: 4.4-5.8 ms unpinned, 3.5-3.7 pinned; two chains stepping at once:
    355-420 ms a step unpinned, 101-120 pinned.
    """
    lib = _openmp()
    allowed = sorted(os.sched_getaffinity(0))
    n = torch.get_num_threads()
    parallel = getattr(lib, "GOMP_parallel", None)
    thread_num = getattr(lib, "omp_get_thread_num", None)
    if n < 2 or n != len(allowed) or parallel is None or thread_num is None:
        return []
    thread_num.restype = ctypes.c_int
    parallel.restype = None
    parallel.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
    pinned: list[int] = []
    failed: list[BaseException] = []

    @ctypes.CFUNCTYPE(None, ctypes.c_void_p)
    def pin(_data) -> None:  # on every thread of the team (ctypes takes the GIL), master as 0
        try:
            cpu = allowed[thread_num()]
            os.sched_setaffinity(0, {cpu})  # 0: the calling thread
            pinned.append(cpu)
        except BaseException as e:  # must not unwind through OpenMP's C frames
            failed.append(e)

    @ctypes.CFUNCTYPE(None, ctypes.c_void_p)
    def unpin(_data) -> None:
        with contextlib.suppress(BaseException):
            os.sched_setaffinity(0, allowed)

    # torch's parallel ops reuse this thread's team (libgomp keeps its pool, in thread order).
    parallel(ctypes.cast(pin, ctypes.c_void_p), None, n, 0)
    if failed or len(pinned) != n:
        logger.info("could not pin the compute threads (%s): they stay unpinned", failed[:1])
        parallel(ctypes.cast(unpin, ctypes.c_void_p), None, n, 0)
        return []
    return sorted(pinned)
