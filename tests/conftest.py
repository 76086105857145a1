"""Shared fixtures: a tiny random Llama checkpoint, a private cache dir and real peer processes.

Used by every test package; peers started here are killed by process group (DHT child and p2pd).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import swarm.cli  # noqa: F401 - bounds OpenMP spin before torch loads (why: its doc)
from swarm.procs import alive, family, kill_tree, stop_tree
from swarm.tiny_checkpoint import write_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 6-block Llama with hidden size 64 (no tokenizer), written once per test session."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session", autouse=True)
def mesh_cache(tmp_path_factory) -> Iterator[Path]:
    """$SWARM_MESH_CACHE for the whole session (calibrated codes, throughput): never ~/.cache."""
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SWARM_MESH_CACHE", str(root))  # read at each use, and inherited by peers
        yield root


@pytest.fixture(scope="session")
def throughput_cache(mesh_cache) -> Path:
    """A throughput cache file private to this test session (peers measure once)."""
    return mesh_cache / "throughput.json"


def wait_for(
    predicate: Callable[[], object], timeout: float, interval: float = 0.2, what: str = ""
):
    """Poll `predicate` until it returns something truthy; fail the test after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what or predicate}")
        time.sleep(interval)


class PeerProcess:
    """A `swarm-peer` subprocess in its own session; its multiaddrs are read from stdout.

    `prefix` runs it through another command, e.g. `ip netns exec NS` (which execs in place).
    """

    def __init__(
        self,
        args: list[str],
        env: dict | None = None,
        log_path: Path | None = None,
        prefix: list[str] | None = None,
    ):
        self.args = args
        self.log_path = log_path
        self._log = open(log_path, "wb") if log_path else subprocess.DEVNULL
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen(
            [*(prefix or []), sys.executable, "-m", "swarm.cli.peer", *args],
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=full_env,
            cwd=REPO,
            start_new_session=True,  # one process group: the DHT's fork and p2pd die with it
        )
        self.pid = self.proc.pid
        self.maddrs: list[str] = []
        self.stdout_lines: list[str] = []
        self._got_maddr = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._family: dict[int, int] = {}  # descendants seen (pid -> start ticks), reaped by pid

    def _read(self) -> None:
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").strip()
            self.stdout_lines.append(line)
            if line.startswith(("/ip4/", "/ip6/")):
                self.maddrs.append(line)
                self._got_maddr.set()

    def wait_maddrs(self, timeout: float = 60.0) -> list[str]:
        """The printed multiaddrs; fails the test if none come in time."""
        deadline = time.monotonic() + timeout
        while not self._got_maddr.wait(0.2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                break
        if not self._got_maddr.is_set():
            self.kill()
            pytest.fail(f"peer {self.args} printed no multiaddr in {timeout} s:\n{self.log_tail()}")
        time.sleep(0.1)  # the remaining lines follow at once
        self._family.update(family(self.pid))
        return list(self.maddrs)

    @property
    def peer_id(self) -> str:
        return self.wait_maddrs()[0].rsplit("/p2p/", 1)[1]

    def wait_log(self, text: str, timeout: float = 120.0) -> None:
        """Wait until the peer's log holds `text` ("serving blocks"); fail if it exits first."""
        deadline = time.monotonic() + timeout
        while True:
            if self.log_path and self.log_path.exists():
                if text in self.log_path.read_text(errors="replace"):
                    return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"peer {self.args} never logged {text!r}:\n{self.log_tail()}")
            time.sleep(0.2)

    @property
    def noted_children(self) -> list[int]:
        """Descendants noted when the multiaddrs came: pid of the DHT process, p2pd, ..."""
        return list(self._family)

    def children_alive(self) -> list[int]:
        """Descendants noted so far that still run (after a crash, the watchdog should end them)."""
        return [pid for pid, start in self._family.items() if alive(pid, start)]

    def log_tail(self, n: int = 40) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def terminate(self, timeout: float = 20.0) -> int | None:
        """SIGTERM (graceful drain), then SIGKILL of the group if it does not exit in time."""
        stop_tree(self.proc, signal.SIGTERM, grace=timeout, seen=self._family)
        self._close_log()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the process group and every descendant seen, by pid (no orphans left)."""
        kill_tree(self.proc, self._family)
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not subprocess.DEVNULL:
            self._log.close()


@pytest.fixture
def peer_factory(tmp_path, throughput_cache) -> Iterator[Callable[..., PeerProcess]]:
    """Start `swarm-peer` subprocesses (args after `swarm-peer`); all are killed at teardown."""
    started: list[PeerProcess] = []

    def start(*args: str, env: dict | None = None) -> PeerProcess:
        env = {"SWARM_MESH_CACHE": str(throughput_cache.parent), **(env or {})}
        proc = PeerProcess(list(args), env=env, log_path=tmp_path / f"peer{len(started)}.log")
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()


@dataclass
class Swarm:
    """Peers of one model on 127.0.0.1 (name -> process, the first one bootstraps the rest) and
    a client-mode DHT that reads their records."""

    boot: list[str]
    peers: dict[str, PeerProcess]
    dht: Any
    prefix: str
    num_blocks: int
    logs: Path  # the peers' logs: NAME.log

    @property
    def maddrs(self) -> dict[str, list[str]]:
        return {name: p.wait_maddrs() for name, p in self.peers.items()}

    @property
    def peer_ids(self) -> dict[str, str]:
        return {name: p.peer_id for name, p in self.peers.items()}

    @property
    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self.peers.items()}

    def online(self) -> list:
        """The records announced "online" (stale ones of killed peers included, as on the DHT)."""
        from swarm.peer.dht_view import fetch_swarm

        if self.dht is None:
            return []
        try:
            records = fetch_swarm(self.dht, self.prefix, self.num_blocks, 5.0)
        except Exception:  # not answering yet
            return []
        return [r for r in records if r.state == "online"]

    def by_peer_id(self, peer_id: str) -> PeerProcess:
        return next(p for p in self.peers.values() if p.peer_id == peer_id)

    def kill(self, name: str) -> None:
        """SIGKILL peer `name` with its DHT process and p2pd, by pid (to crash the process
        only, as a real crash leaves them, use os.kill on its pid)."""
        self.peers[name].kill()

    def close_dht(self) -> None:
        if self.dht is not None:
            self.dht.shutdown()
            self.dht = None

    def close(self) -> None:
        self.close_dht()
        for p in self.peers.values():
            p.kill()


@pytest.fixture(scope="module")
def swarm_factory(tmp_path_factory, tiny_model_dir, throughput_cache) -> Iterator[Callable]:
    """Start a swarm of `swarm-peer join` processes and wait until all are online; every swarm
    the module started is torn down by pid after its last test.

    start(spans, model=None, flags=("--quant", "none"), extra=None, prefix=None) -> Swarm:
    spans: name -> --stage, in start order (the first bootstraps the others). model: what they
    serve (the tiny model by default). flags: given to every peer; extra: name -> more flags
    for that peer; prefix: name -> a command the peer runs through (tests/adversary_peer.py).
    """
    from swarm.dht import make_dht  # readers check signatures (and strip them)
    from swarm.model.loading import load_config, resolve_model

    started: list[Swarm] = []

    def start(
        spans: dict[str, str],
        model: Path | None = None,
        flags: Sequence[str] = ("--quant", "none"),
        extra: dict[str, Sequence[str]] | None = None,
        prefix: dict[str, list[str]] | None = None,
    ) -> Swarm:
        model = model or tiny_model_dir
        source = resolve_model(str(model))
        logs = tmp_path_factory.mktemp("swarm")
        env = {"SWARM_MESH_CACHE": str(throughput_cache.parent)}
        base = ["join", "--model", str(model), "--max-start-delay", "0", *flags]
        s = Swarm([], {}, None, source.name, load_config(source).num_layers, logs)
        started.append(s)
        for name, stage in spans.items():
            args = [*base, "--stage", stage, *(extra or {}).get(name, ())]
            if s.boot:
                args += ["--initial-peers", *s.boot]
            pre = (prefix or {}).get(name)
            s.peers[name] = PeerProcess(args, env, logs / f"{name}.log", prefix=pre)
            if not s.boot:
                s.boot = s.peers[name].wait_maddrs(180)
        for p in s.peers.values():
            p.wait_maddrs(180)
        s.dht = make_dht(initial_peers=s.boot, client_mode=True, start=True)
        n = len(spans)
        wait_for(lambda: len(s.online()) == n, 240, 0.5, f"{n} peers online")
        return s

    yield start
    for s in started:
        s.close()


def connect(swarm: Swarm, model_dir: Path, **kw: Any):
    """A client of `swarm` for `model_dir`; kw are DistributedModelForCausalLM.from_pretrained's."""
    from petals_like.model import DistributedModelForCausalLM

    return DistributedModelForCausalLM.from_pretrained(str(model_dir), swarm.boot, **kw)
