"""What a user gets wrong comes back as one `PROG: error: ...` line and a non-zero exit status.

Runs the real CLIs as subprocesses: bad and unreachable `--initial-peers`, an unknown model, and
a `--port` another P2P daemon (a real hivemind DHT in this test) already listens on.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import hivemind
import pytest

REPO = Path(__file__).resolve().parents[2]
PEER_ID = "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"  # valid, nobody runs it


def run(module: str, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def error_line(proc: subprocess.CompletedProcess, prog: str) -> str:
    """The one line the CLI printed (hivemind's import warnings aside), checked for its form."""
    assert proc.returncode == 1, proc
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith(f"{prog}: ")]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), proc.stderr
    return lines[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(120)
def test_bad_and_unreachable_initial_peers():
    line = error_line(
        run("swarm.cli.peer", "status", "--initial-peers", "127.0.0.1:1"), "swarm-peer"
    )
    assert "not a multiaddr" in line and "/p2p/" in line
    bare = f"/ip4/127.0.0.1/tcp/{free_port()}"
    line = error_line(run("swarm.cli.train", "--data", "x", "--initial-peers", bare), "swarm-train")
    assert "must end in /p2p/PEER_ID" in line
    nobody = f"{bare}/p2p/{PEER_ID}"
    line = error_line(run("swarm.cli.peer", "status", "--initial-peers", nobody), "swarm-peer")
    assert "could not reach any of --initial-peers: is the peer running" in line


@pytest.mark.timeout(60)
def test_unknown_model():
    line = error_line(run("swarm.cli.peer", "join", "--model", "smollm2-1.7b"), "swarm-peer")
    assert "model 'smollm2-1.7b' not found" in line and "smollm2-135m" in line


@pytest.mark.timeout(60)
def test_a_port_in_use_is_an_error(tiny_model_dir):
    port = free_port()
    dht = hivemind.DHT(host_maddrs=[f"/ip4/127.0.0.1/tcp/{port}"], start=True)
    try:
        args = ("join", "--model", str(tiny_model_dir), "--port", str(port))
        line = error_line(run("swarm.cli.peer", *args), "swarm-peer")
        assert f"port {port} on 127.0.0.1 is in use" in line
    finally:
        dht.shutdown()
