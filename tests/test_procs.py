"""The watchdog a CLI starts: whatever the process started dies with it, even after a SIGKILL.

Runs a real Python process that starts the watchdog and a child in a session of its own (so no
process-group signal reaches it), SIGKILLs that process, and waits for the child to go.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from swarm.procs import WATCH_PERIOD, alive, kill_tree, start_ticks
from tests.conftest import wait_for

REPO = Path(__file__).resolve().parents[1]

PARENT = textwrap.dedent(
    """
    import subprocess, sys, time
    from swarm.procs import reap_children_on_exit
    reap_children_on_exit()
    child = subprocess.Popen(["sleep", "600"], start_new_session=True)
    print(child.pid, flush=True)
    time.sleep(600)
    """
)


@pytest.mark.timeout(60)
def test_children_die_after_their_parent_is_sigkilled():
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT], cwd=REPO, stdout=subprocess.PIPE, start_new_session=True
    )
    child = start = None
    try:
        child = int(parent.stdout.readline())
        start = start_ticks(child)
        assert start >= 0
        time.sleep(3 * WATCH_PERIOD)  # the watchdog (a Python process) starts and notes the child
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        wait_for(lambda: not alive(child, start), 10, 0.1, "the orphan to be killed")
    finally:
        kill_tree(parent, {child: start} if child else None)
