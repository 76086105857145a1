"""swarm.threads: threads that run torch serially start no OpenMP team; loading threads exit.

OpenMP threads are counted in /proc in a fresh interpreter, so nothing else in the test process
has started a team.
"""

import asyncio
import json
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

from swarm import loops
from swarm.threads import in_own_thread, serial_executor, serial_torch

# In a fresh process: the OS threads added by a parallel op on a serial thread, on a plain one,
# and left once a plain thread that ran one has exited.
PROBE = textwrap.dedent(
    """
    import json, os, threading, time
    import torch
    from swarm.threads import serial_torch
    torch.set_num_threads(3)
    x = torch.randn(1 << 20)

    def count():
        time.sleep(0.2)
        return len(os.listdir("/proc/self/task"))

    def op(serial):
        if serial:
            serial_torch()
        (x * 2.0).sum()
        return torch.get_num_threads()

    def on_thread(serial, keep):
        out, done = {}, threading.Event()
        def main():
            out["threads"] = op(serial)
            out["count"] = count()
            done.set()
            keep.wait()
        threading.Thread(target=main, daemon=True).start()
        done.wait()
        return out

    base = count()
    keep = threading.Event()
    serial = on_thread(True, keep)
    plain = on_thread(False, keep)
    print(json.dumps({
        "serial_threads": serial["threads"], "serial_added": serial["count"] - base - 1,
        "plain_threads": plain["threads"], "plain_added": plain["count"] - base - 2,
    }))
    """
)


@pytest.mark.timeout(120)
def test_a_serial_thread_starts_no_openmp_team_and_others_keep_theirs():
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=100, check=True
    )
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["serial_threads"] == 1
    assert got["serial_added"] == 0, got  # no OpenMP threads for the serial thread's op
    assert got["plain_threads"] == 3
    assert got["plain_added"] == 2, got  # a team of 3: the thread itself and 2 OpenMP threads


@pytest.mark.timeout(60)
def test_serial_executor_threads_report_one_torch_thread_and_the_caller_keeps_its_count():
    before = torch.get_num_threads()
    with serial_executor(2) as pool:
        counts = set(pool.map(lambda _: torch.get_num_threads(), range(8)))
    assert counts == {1}
    assert torch.get_num_threads() == before


@pytest.mark.timeout(60)
def test_to_thread_on_our_loops_is_serial():
    async def main():
        return await asyncio.to_thread(torch.get_num_threads)

    assert loops.run(main(), default="asyncio") == 1
    assert loops.run(main(), default="uvloop") == 1


@pytest.mark.timeout(60)
def test_in_own_thread_returns_raises_and_its_thread_exits():
    seen: list[threading.Thread] = []

    def work():
        seen.append(threading.current_thread())
        return torch.get_num_threads()

    def fail():
        raise ValueError("bad shard")

    async def main():
        n = await in_own_thread(work, "test-load")
        with pytest.raises(ValueError, match="bad shard"):
            await in_own_thread(fail)
        return n

    assert loops.run(main()) == torch.get_num_threads()  # a new thread keeps the default count
    assert seen[0] is not threading.current_thread() and seen[0].name == "test-load"
    seen[0].join(timeout=5)
    assert not seen[0].is_alive()


def test_serial_torch_changes_only_the_calling_thread():
    before = torch.get_num_threads()
    box = {}

    def main():
        serial_torch()
        box["n"] = torch.get_num_threads()

    t = threading.Thread(target=main)
    t.start()
    t.join()
    assert box["n"] == 1
    assert torch.get_num_threads() == before
