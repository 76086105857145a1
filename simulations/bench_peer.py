"""Peer benchmark on loopback: inference step latency through 1, 2, 3 peers vs the same blocks
run locally (overhead per hop), and forward throughput with and without the int8 wire codec.

Run: python -m simulations.bench_peer [--model PATH] [--steps N] [--json]; prints a table
(JSON with --json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from simulations.cli_help import DefaultsHelpFormatter
from simulations.progress import Progress
from simulations.scratch import scratch_dir
from swarm.dht import make_dht
from swarm.procs import family, kill_tree

REPO = Path(__file__).resolve().parents[1]
FORWARD_CODECS = ("none", "int8-block64")


def _start_peer(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "swarm.cli.peer", "join", *args],
        stdout=subprocess.PIPE,
        stderr=open(log, "wb"),
        cwd=REPO,
        start_new_session=True,  # its group holds the DHT's fork and p2pd: kill_tree reaps them
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _maddr(proc: subprocess.Popen, timeout: float = 120.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline().decode().strip()
        if line.startswith(("/ip4/", "/ip6/")):
            return line
        if proc.poll() is not None:
            break
    raise RuntimeError("peer printed no multiaddr")


def _spans(num_blocks: int, hops: int) -> list[tuple[int, int]]:
    cuts = [round(i * num_blocks / hops) for i in range(hops + 1)]
    return list(zip(cuts[:-1], cuts[1:], strict=True))


async def _bench(dht, model, spans, peer_ids, steps: int, batch_tokens: int) -> dict:
    import torch

    from swarm.peer import PeerClient

    p2p = await dht.replicate_p2p()
    client = PeerClient(p2p)
    h = model.config.hidden_size
    results: dict = {}
    for hops in (1, 2, 3):
        chain = _spans(model.config.num_layers, hops)
        ids = [peer_ids[c] for c in chain]
        sessions = [
            await client.open_inference(pid, s, e, steps + 8)
            for pid, (s, e) in zip(ids, chain, strict=False)
        ]
        x = torch.randn(1, 1, h)
        for sess in sessions:  # warm-up step
            x = await sess.step(x, 0)
        t0 = time.perf_counter()
        for pos in range(1, steps + 1):
            x = torch.randn(1, 1, h)
            for sess in sessions:
                x = await sess.step(x, pos)
        remote_ms = (time.perf_counter() - t0) / steps * 1e3
        for sess in sessions:
            await sess.close()
        caches = model.span.new_caches(1, steps + 8)
        with torch.inference_mode():
            model.span(torch.randn(1, 1, h), 0, caches)
            t0 = time.perf_counter()
            for pos in range(1, steps + 1):
                model.span(torch.randn(1, 1, h), pos, caches)
        local_ms = (time.perf_counter() - t0) / steps * 1e3
        results[f"{hops}_peers"] = {
            "step_ms": round(remote_ms, 2),
            "local_step_ms": round(local_ms, 2),
            "overhead_per_hop_ms": round((remote_ms - local_ms) / hops, 2),
        }
    pid = peer_ids[(0, model.config.num_layers)]
    x = torch.randn(1, batch_tokens, h)
    for codec in FORWARD_CODECS:
        await client.forward(pid, x, 0, model.config.num_layers, codec=codec)
        t0 = time.perf_counter()
        n = 5
        for _ in range(n):
            await client.forward(pid, x, 0, model.config.num_layers, codec=codec)
        results[f"forward_tokens_per_s_{codec}"] = round(
            n * batch_tokens / (time.perf_counter() - t0), 1
        )
    return results


def format_table(results: dict) -> str:
    """The figures as lines a person reads: one row per chain length, then the forward rates."""
    lines = [
        f"model {results['model']}; {results['steps']} timed inference steps per chain, "
        "batch 1, one token per step",
        f"{'peers':>5} {'step ms':>8} {'local ms':>9} {'overhead/hop ms':>16}",
    ]
    for hops in (1, 2, 3):
        r = results[f"{hops}_peers"]
        lines.append(
            f"{hops:>5} {r['step_ms']:>8.2f} {r['local_step_ms']:>9.2f} "
            f"{r['overhead_per_hop_ms']:>16.2f}"
        )
    rates = ", ".join(
        f"{codec} {results[f'forward_tokens_per_s_{codec}']:.0f}" for codec in FORWARD_CODECS
    )
    lines.append(f"forward of {results['batch_tokens']} tokens through one peer, tokens/s: {rates}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.bench_peer",
        description=__doc__.split("\n\n")[0],
        epilog="Starts one peer per span of the 1-, 2- and 3-peer chains (6 peers); progress "
        "goes to stderr at least every 10 s.",
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("--model", default="smollm2-135m", help="model name or path")
    parser.add_argument("--steps", type=int, default=20, help="timed inference steps per chain")
    parser.add_argument("--batch-tokens", type=int, default=512, help="tokens per forward call")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    args = parser.parse_args()
    with Progress("bench_peer") as progress, scratch_dir("bench_peer_") as logs:
        try:
            results = run(args, logs, progress)
        except KeyboardInterrupt:
            print("bench_peer: interrupted; peers stopped", file=sys.stderr)
            sys.exit(130)
        except RuntimeError as e:
            print(f"bench_peer: {e}", file=sys.stderr)
            sys.exit(1)
    results = {
        "model": args.model,
        "steps": args.steps,
        "batch_tokens": args.batch_tokens,
        **results,
    }
    for hops in (1, 2, 3):  # flat names for the headline figures
        results[f"overhead_per_hop_ms_{hops}_peers"] = results[f"{hops}_peers"][
            "overhead_per_hop_ms"
        ]
    print(json.dumps(results) if args.json else format_table(results))


def run(args: argparse.Namespace, logs: Path, progress: Progress) -> dict:
    """Start the peers, measure, stop them (by process group and pid); the figures."""

    from swarm.model.loading import load_config, load_model

    num_layers = load_config(args.model).num_layers
    wanted = sorted({s for hops in (1, 2, 3) for s in _spans(num_layers, hops)})
    procs: list[subprocess.Popen] = []
    seen: dict[int, int] = {}  # descendants of the peers (pid -> start ticks), reaped by pid
    dht = None
    try:
        progress.update(f"starting {len(wanted)} peers, one per span: {wanted}")
        common = ["--model", args.model, "--quant", "none", "--announce-period", "30"]
        common += ["--max-request-tokens", "65536"]  # fp32 peers: compared with the local model
        first = _start_peer(["--stage", "{}:{}".format(*wanted[0]), *common], logs / "p0.log")
        procs.append(first)
        boot = _maddr(first)
        for i, span in enumerate(wanted[1:], 1):
            procs.append(
                _start_peer(
                    ["--stage", "{}:{}".format(*span), "--initial-peers", boot, *common],
                    logs / f"p{i}.log",
                )
            )
        ids = {wanted[0]: boot.rsplit("/p2p/", 1)[1]}
        for span, proc in zip(wanted[1:], procs[1:], strict=True):
            ids[span] = _maddr(proc).rsplit("/p2p/", 1)[1]
        for proc in procs:
            seen.update(family(proc.pid))
        dht = make_dht(initial_peers=[boot], client_mode=True, start=True)
        model = load_model(args.model, progress=False)
        time.sleep(2)
        progress.update("waiting for every peer to serve, then measuring")
        return asyncio.run(_wait_and_bench(dht, model, wanted, ids, args))
    finally:
        progress.update("stopping the peers")
        if dht is not None:
            dht.shutdown()
        for proc in procs:
            kill_tree(proc, seen)


async def _wait_and_bench(dht, model, spans, ids, args) -> dict:
    from swarm.peer import PeerClient

    p2p = await dht.replicate_p2p()
    client = PeerClient(p2p)
    for pid in ids.values():  # wait until every peer serves (bounded)
        for _ in range(240):
            try:
                if (await client.info(pid, timeout=5)).state == "online":
                    break
            except Exception:
                pass
            await asyncio.sleep(0.5)
    return await _bench(dht, model, spans, ids, args.steps, args.batch_tokens)


if __name__ == "__main__":
    main()
