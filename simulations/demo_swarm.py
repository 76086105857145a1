"""A local swarm on 127.0.0.1 (bootstrap DHT plus peers) that generates text, then shuts down.

Run by `make demo` (`python -m simulations.demo_swarm`); `LocalSwarm` and `start_local_swarm`
are reused by the benchmarks. Every process is stopped by pid and process group; a temp log dir
is removed at close.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

from simulations.progress import Progress
from simulations.scratch import raise_interrupt, scratch_dir
from swarm.dht import make_dht
from swarm.procs import family, stop_tree
from swarm.quant import DEFAULT_PEER_QUANT, QUANT_MODES

REPO = Path(__file__).resolve().parents[1]


class Proc:
    """A child process in its own session, its stdout in a file we poll (no reader threads)."""

    def __init__(self, name: str, args: list[str], log_dir: Path):
        self.name = name
        self.out_path, self.err_path = log_dir / f"{name}.out", log_dir / f"{name}.err"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, *args],
                stdout=out,
                stderr=err,
                cwd=REPO,
                env=env,
                start_new_session=True,
            )
        self.pid = self.proc.pid
        self.family: dict[int, int] = {}  # descendants seen (pid -> start ticks), reaped by pid

    def maddrs(self, timeout: float) -> list[str]:
        """The multiaddrs it printed on stdout; raises RuntimeError if none come in time."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = self.out_path.read_text(errors="replace").splitlines()
            found = [ln.strip() for ln in lines if ln.startswith(("/ip4/", "/ip6/"))]
            if found:
                time.sleep(0.1)
                self.family.update(family(self.pid))
                lines = self.out_path.read_text(errors="replace").splitlines()
                return [ln.strip() for ln in lines if ln.startswith(("/ip4/", "/ip6/"))]
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} printed no multiaddr in {timeout:.0f} s:\n{self.tail()}")

    @property
    def peer_id(self) -> str:
        return self.maddrs(60)[0].rsplit("/p2p/", 1)[1]

    def tail(self, n: int = 15) -> str:
        return "\n".join(self.err_path.read_text(errors="replace").splitlines()[-n:])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL, group: bool = True) -> None:
        """Send `sig` to the process (and its group); remember its descendants to reap later."""
        if self.alive():
            self.family.update(family(self.pid))
        try:
            if group:
                os.killpg(self.pid, sig)
            else:
                os.kill(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM, then SIGKILL of the group and of every descendant seen, by pid."""
        stop_tree(self.proc, signal.SIGTERM, grace, self.family)


class LocalSwarm:
    """A bootstrap DHT and `swarm-peer join` processes on 127.0.0.1.

    model: what the peers serve (alias, folder or .gguf). log_dir: where their logs go.
    """

    def __init__(self, model: str, log_dir: Path | None = None):
        self.model = model
        self._scratch = ExitStack()  # a temp log dir lives until close()
        self.log_dir = self._scratch.enter_context(scratch_dir("swarm-demo-", log_dir))
        self.procs: list[Proc] = []
        self.bootstrap: list[str] = []

    def start_bootstrap(self, timeout: float = 60.0) -> list[str]:
        p = Proc("bootstrap", ["-m", "simulations.demo_swarm", "bootstrap"], self.log_dir)
        self.procs.append(p)
        self.bootstrap = p.maddrs(timeout)
        return self.bootstrap

    def start_peer(self, *args: str, name: str | None = None) -> Proc:
        name = name or f"peer{len(self.procs)}"
        cmd = ["-m", "swarm.cli.peer", "join", "--model", self.model, *args]
        if self.bootstrap:
            cmd += ["--initial-peers", *self.bootstrap]
        p = Proc(name, cmd, self.log_dir)
        self.procs.append(p)
        return p

    def wait_online(
        self, dht, prefix: str, num_blocks: int, peers: int, timeout: float, cover: bool = True
    ) -> list:
        """Wait until `peers` peers are online (and, if `cover`, every block is served)."""
        from swarm.peer import fetch_swarm

        deadline = time.monotonic() + timeout
        records: list = []
        while time.monotonic() < deadline:
            try:
                records = fetch_swarm(dht, prefix, num_blocks, timeout=5.0)
            except Exception:  # the DHT may not answer yet: keep polling until the deadline
                records = []
            online = [r for r in records if r.state == "online"]
            covered = {b for r in online for b in range(r.start, r.end)}
            if len(online) >= peers and (not cover or len(covered) == num_blocks):
                return online
            for p in self.procs:
                if not p.alive():
                    raise RuntimeError(f"{p.name} exited early:\n{p.tail()}")
            time.sleep(0.5)
        raise RuntimeError(f"the swarm was not ready in {timeout:.0f} s: {records}")

    def close(self) -> None:
        # Peers first (they announce OFFLINE on SIGTERM), the bootstrap last; a second Ctrl-C
        # must not leave processes behind.
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            for p in reversed(self.procs):
                p.stop()
            self.procs.clear()
            self._scratch.close()
        finally:
            signal.signal(signal.SIGINT, old)

    def __enter__(self) -> LocalSwarm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_local_swarm(
    model: str, spans: list[str], num_blocks: int, prefix: str, *flags: str, timeout: float = 600.0
) -> tuple[LocalSwarm, list[str]]:
    """A LocalSwarm with one peer per span (each also given `flags`), once all are online.

    Returns the swarm (the caller closes it) and the bootstrap's multiaddrs; a swarm that does
    not come up is closed before the error is raised.
    """
    swarm = LocalSwarm(model)
    try:
        boot = swarm.start_bootstrap()
        dht = make_dht(initial_peers=boot, client_mode=True, start=True)
        try:
            for s in spans:
                swarm.start_peer("--stage", s, "--max-start-delay", "0", *flags)
            swarm.wait_online(dht, prefix, num_blocks, len(spans), timeout)
        finally:
            dht.shutdown()
    except BaseException:
        swarm.close()
        raise
    return swarm, boot


def run_bootstrap() -> None:
    """A DHT node that only helps others meet: prints its multiaddrs, runs until SIGTERM."""

    dht = make_dht(host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
    for m in dht.get_visible_maddrs():
        print(m, flush=True)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    while not stop:
        time.sleep(0.2)
    dht.shutdown()


def run_demo(args: argparse.Namespace) -> int:

    from swarm.model.loading import load_config, resolve_model

    t0 = time.monotonic()
    source = resolve_model(args.model)
    config = load_config(source)
    swarm = LocalSwarm(args.model)
    print(f"demo: logs in {swarm.log_dir} (removed at exit)", file=sys.stderr)
    dht = None
    progress = Progress("demo")
    try:
        boot = swarm.start_bootstrap()
        print(f"demo: bootstrap at {boot[0]}", file=sys.stderr)
        # Our DHT client process is forked now, before anything starts threads.
        dht = make_dht(initial_peers=boot, client_mode=True, start=True)
        progress.start()
        # Spans of ceil(N / peers) blocks: the balancer places each flush with the gap it fills,
        # so the peers tile the model.
        per_peer = -(-config.num_layers // max(1, args.peers))
        for i in range(args.peers):
            progress.update(f"starting peer {i + 1} of {args.peers} ({args.quant} weights)")
            # One at a time, so each --stage auto peer sees where the swarm is weakest.
            swarm.start_peer(
                "--stage",
                "auto",
                "--num-blocks",
                str(per_peer),
                "--quant",
                args.quant,
                "--max-start-delay",
                "0",
                "--announce-period",
                "5",
            )
            swarm.wait_online(
                dht, source.name, config.num_layers, i + 1, args.ready_timeout, cover=False
            )
        records = swarm.wait_online(dht, source.name, config.num_layers, args.peers, 30)
        spans = ", ".join(f"{r.start}:{r.end}" for r in sorted(records, key=lambda r: r.start))
        # The client streams text and prints its own summary: say this once.
        progress.update(
            f"{args.peers} peers serve {spans} ({time.monotonic() - t0:.0f} s); generating",
            repeat=False,
        )
        cmd = [
            sys.executable,
            "-m",
            "petals_like.cli",
            args.prompt,
            "--model",
            args.model,
            "--initial-peers",
            *boot,
            "--max-new-tokens",
            str(args.max_new_tokens),
            "--compression",
            args.compression,
        ]
        if args.chat:
            cmd.append("--chat")
        rc = subprocess.call(cmd, cwd=REPO, timeout=args.generate_timeout)
        print(f"demo: generation exited with {rc}", file=sys.stderr)
        return rc
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        print(f"demo: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("demo: interrupted", file=sys.stderr)
        return 130
    finally:
        progress.update("stopping the swarm")
        if dht is not None:
            dht.shutdown()
        swarm.close()
        progress.stop()
        print(f"demo: swarm shut down ({time.monotonic() - t0:.0f} s in all)", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="start a local swarm, generate through it, stop it")
    p.add_argument("mode", nargs="?", default="demo", choices=("demo", "bootstrap"))
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--peers", type=int, default=3)
    p.add_argument("--quant", default=DEFAULT_PEER_QUANT, choices=QUANT_MODES)
    p.add_argument("--compression", default="auto")
    p.add_argument("--prompt", default="What is the capital of France?")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--ready-timeout", type=float, default=120.0)
    p.add_argument("--generate-timeout", type=float, default=180.0)
    args = p.parse_args(argv)
    if args.mode == "bootstrap":
        run_bootstrap()
        return
    # SIGTERM unwinds like Ctrl-C, so the swarm is shut down by the `finally` of run_demo.
    signal.signal(signal.SIGTERM, raise_interrupt)
    sys.exit(run_demo(args))


if __name__ == "__main__":
    main()
