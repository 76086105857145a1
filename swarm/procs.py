"""Process trees of locally started peers: descendants read from /proc, killed and reaped by pid.

Used by the CLIs (`reap_children_on_exit`: nothing a peer started outlives it, however it dies),
and by the local demo, the real-process churn harness and the tests to reap peers by pid.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

logger = logging.getLogger(__name__)


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state first), or None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces or parentheses: fields start after the last ')'.
    return stat.rsplit(")", 1)[1].split()


def descendants(pid: int) -> list[int]:
    """Every live descendant of `pid` (children first), from a scan of /proc's parent pids."""
    by_parent: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        fields = _stat(int(entry)) if entry.isdigit() else None
        if fields is not None:
            by_parent.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in by_parent.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def start_ticks(pid: int) -> int:
    """When `pid` started (clock ticks since boot; -1: gone): with the pid, its identity."""
    fields = _stat(pid)
    return int(fields[19]) if fields else -1


def alive(pid: int, start: int | None = None) -> bool:
    """True if `pid` runs, is not a zombie, and (if given) started at `start` (not a reused pid)."""
    fields = _stat(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return False
    return start is None or int(fields[19]) == start


def family(pid: int) -> dict[int, int]:
    """The live descendants of `pid`, each with its start ticks: what to reap later by pid."""
    found = {child: start_ticks(child) for child in descendants(pid)}
    return {child: start for child, start in found.items() if start >= 0}


def kill_tree(
    proc: subprocess.Popen, seen: Mapping[int, int] | None = None, timeout: float = 10.0
) -> list[int]:
    """SIGKILL a child, its process group and every descendant, by pid; reap the child.

    proc: a child started with `start_new_session=True`, so that its process group id is its pid.
    seen: descendants noted earlier (pid -> start ticks, from `family`), which outlive a dead
        parent as orphans; a pid whose start ticks changed is another process and is spared.
    timeout: seconds to wait for the child (reaped, so `proc.returncode` is set) and the rest.
    Returns the pids still running after `timeout`: empty when the whole tree is gone.
    """
    tree = {**(seen or {}), **(family(proc.pid) if proc.poll() is None else {})}
    tree.pop(proc.pid, None)
    targets = [(os.killpg, proc.pid)]
    if proc.returncode is None:  # a reaped child's pid may already name another process
        targets.append((os.kill, proc.pid))
    targets += [(os.kill, pid) for pid, start in sorted(tree.items()) if alive(pid, start)]
    for send, pid in targets:
        try:
            send(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + timeout
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        logger.warning("pid %d did not exit after SIGKILL", proc.pid)
    left = [pid for pid, start in tree.items() if alive(pid, start)]
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [pid for pid in left if alive(pid, tree[pid])]
    return ([proc.pid] if proc.returncode is None else []) + left


def stop_tree(
    proc: subprocess.Popen,
    sig: int = signal.SIGTERM,
    grace: float = 15.0,
    seen: Mapping[int, int] | None = None,
    timeout: float = 10.0,
) -> list[int]:
    """Send `sig` to the child alone (SIGTERM: a peer drains), wait `grace` s, then `kill_tree`.

    Its descendants are noted before the signal, so that those it leaves behind are reaped too.
    Returns what `kill_tree` returns: the pids still running at the end.
    """
    tree = {**(seen or {})}
    if proc.poll() is None:
        tree.update(family(proc.pid))
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    return kill_tree(proc, tree, timeout)


WATCH_PERIOD = 0.5  # seconds between the watchdog's looks at its parent's tree


def reap_children_on_exit() -> subprocess.Popen:
    """Start a watchdog that kills this process's descendants once this process is gone.

    A SIGKILLed process runs no cleanup, and hivemind's forked DHT process and its p2pd (with
    torch_shm_manager, ~0.5 GB) would live on, adopted by init. The watchdog notes the tree every
    WATCH_PERIOD s, so a child started less than that before a crash may escape it. Call this
    first, before the DHT forks. Its own session keeps it out of Ctrl-C aimed at the CLI.
    """
    me = os.getpid()
    return subprocess.Popen(
        [sys.executable, "-m", "swarm.procs", str(me), str(start_ticks(me))],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,  # holding the CLI's pipes open would hang readers at EOF
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def watch(parent: int, parent_start: int, grace: float = 2.0) -> None:
    """The watchdog's loop: while `parent` lives, note its tree; then SIGTERM, later SIGKILL it."""
    me = os.getpid()
    seen: dict[int, int] = {}
    while alive(parent, parent_start):
        seen.update(family(parent))
        time.sleep(WATCH_PERIOD)
    seen.pop(me, None)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        left = {pid: start for pid, start in seen.items() if alive(pid, start)}
        for pid in left:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while left and time.monotonic() < deadline:
            time.sleep(0.05)
            left = {pid: start for pid, start in left.items() if alive(pid, start)}
        seen = left


if __name__ == "__main__":  # python -m swarm.procs PARENT_PID PARENT_START_TICKS
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    watch(int(sys.argv[1]), int(sys.argv[2]))
