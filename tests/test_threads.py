"""swarm.threads: threads that run torch serially start no OpenMP team; loading threads exit.

OpenMP threads are counted in /proc in a fresh interpreter, so nothing else in the test process
has started a team.
"""

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

from swarm import loops
from swarm.threads import in_own_thread, serial_executor, serial_torch

# In a fresh process allowed 2 CPUs: pin_team on a thread with a team of `threads` (argv[1]);
# the CPUs it returned, each thread's allowed CPUs after a parallel op, and the CPUs used.
PIN_PROBE = textwrap.dedent(
    """
    import json, os, sys, threading
    import torch
    from swarm.threads import pin_team
    cpus = sorted(os.sched_getaffinity(0))[:2]
    os.sched_setaffinity(0, cpus)
    torch.set_num_threads(int(sys.argv[1]))
    out = {"cpus": cpus}

    def main():
        out["pinned"] = pin_team()
        out["before"] = len(os.listdir("/proc/self/task"))
        (torch.randn(1 << 22) * 2.0).sum()  # a parallel op: on the pinned team
        out["after"] = len(os.listdir("/proc/self/task"))
        out["me"] = sorted(os.sched_getaffinity(0))
        out["threads"] = {
            t: sorted(os.sched_getaffinity(int(t))) for t in os.listdir("/proc/self/task")
        }

    t = threading.Thread(target=main)
    t.start()
    t.join()
    out["main"] = sorted(os.sched_getaffinity(0))
    print(json.dumps(out))
    """
)

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


def _pin_probe(threads: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PIN_PROBE, str(threads)],
        capture_output=True,
        text=True,
        timeout=100,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(120)
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs")
def test_pin_team_pins_a_team_that_spans_the_cpus_one_thread_per_cpu():
    got = _pin_probe(2)
    c0, c1 = got["cpus"]
    assert got["pinned"] == [c0, c1]
    assert got["me"] == [c0]  # the master: the calling thread
    pinned = sorted(cpus for cpus in got["threads"].values() if len(cpus) == 1)
    assert pinned == [[c0], [c1]], got  # the master and its one helper, nothing else
    assert got["main"] == [c0, c1]  # other threads keep every CPU
    assert got["after"] == got["before"], got  # torch's ops ran on the pinned team


@pytest.mark.timeout(120)
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs")
def test_pin_team_leaves_one_thread_and_a_team_unlike_the_cpus_alone(threads):
    got = _pin_probe(threads)
    assert got["pinned"] == []
    assert all(cpus == got["cpus"] for cpus in got["threads"].values()), got
