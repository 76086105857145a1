"""NAT benchmark in network namespaces: round trip and decoding speed through a relayed peer
against a direct one, both serving the whole model, measured by a client behind its own NAT.
A third, public peer is the bootstrap and the relay.

Run (root, `ip` and `nft`): python -m simulations.bench_nat [--model PATH] [--steps N] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from simulations.cli_help import DefaultsHelpFormatter
from simulations.scratch import scratch_dir
from swarm.dht import make_dht
from swarm.netlab import Netlab, leftover_namespaces, missing_tools
from swarm.procs import family, kill_tree

REPO = Path(__file__).resolve().parents[1]


def _start(lab: Netlab, host: str, args: list[str], log: Path) -> subprocess.Popen:
    cmd = [*lab.exec(host), sys.executable, "-m", "swarm.cli.peer", "join", *args]
    cmd += ["--host", lab.address(host), "--max-start-delay", "0"]
    return subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=open(log, "wb"),  # noqa: SIM115 - the child holds it
        cwd=REPO,
        start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _maddrs(proc: subprocess.Popen, timeout: float = 120.0) -> list[str]:
    """The first multiaddr the peer prints (the others follow; nobody reads them)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline().decode().strip()
        if line.startswith("/ip4/"):
            return [line]
        if proc.poll() is not None:
            break
    raise RuntimeError("peer printed no multiaddr")


async def _measure(boot: list[str], model: str, peers: dict, steps: int, pings: int) -> dict:
    """Client side (runs in the client's home): ping and decode through each peer."""
    import torch

    from swarm.model.loading import load_config, resolve_model
    from swarm.peer import PeerClient
    from swarm.peer.dht_view import fetch_swarm_async

    source = resolve_model(model)
    config = load_config(source)
    dht = make_dht(initial_peers=boot, client_mode=True, start=True)
    try:
        client = PeerClient(await dht.replicate_p2p())
        client.learn_addrs(await fetch_swarm_async(dht, source.name, config.num_layers))
        # Interleaved (one direct, one relayed, ...): the machine's load hits both alike.
        kinds = list(peers)
        rtts: dict[str, list[float]] = {k: [] for k in kinds}
        steps_s: dict[str, list[float]] = {k: [] for k in kinds}
        for kind in kinds:
            await client.ping(peers[kind], timeout=10.0)  # connects (through the relay if relayed)
        for _ in range(pings):
            for kind in kinds:
                rtts[kind].append(await client.ping(peers[kind], timeout=10.0))
        sessions = {
            k: await client.open_inference(peers[k], 0, config.num_layers, steps + 4) for k in kinds
        }
        for kind in kinds:
            await sessions[kind].step(torch.randn(1, 1, config.hidden_size), 0)
        for pos in range(1, steps + 1):
            for kind in kinds:
                x = torch.randn(1, 1, config.hidden_size)
                t0 = time.perf_counter()
                await sessions[kind].step(x, pos)
                steps_s[kind].append(time.perf_counter() - t0)
        for sess in sessions.values():
            await sess.close()
        results = {}
        for kind in kinds:
            step = statistics.median(steps_s[kind])
            results[kind] = {
                "rtt_ms": round(statistics.median(rtts[kind]) * 1e3, 2),
                "rtt_p90_ms": round(_p90(rtts[kind]) * 1e3, 2),
                "step_ms": round(step * 1e3, 2),
                "step_p90_ms": round(_p90(steps_s[kind]) * 1e3, 2),
                "tokens_per_s": round(1 / step, 1),
            }
        return results
    finally:
        dht.shutdown()


def _p90(xs: list[float]) -> float:
    return sorted(xs)[int(0.9 * (len(xs) - 1))]


def run(model: str, steps: int, pings: int, logs: Path) -> dict:
    lab = Netlab().build(public=("pub", "pub2"), homes=("home1", "home2"))
    procs: list[tuple[subprocess.Popen, dict]] = []
    try:
        # The relay (also the bootstrap) serves one block nobody times; the two timed peers are
        # alike but for the relay leg: one public, one behind NAT.
        span = ["--model", model, "--stage", "0:" + str(_num_layers(model))]
        relay_proc = _start(lab, "pub", ["--model", model, "--stage", "0:1"], logs / "relay.log")
        procs.append((relay_proc, {}))
        boot = _maddrs(relay_proc)
        procs[-1] = (relay_proc, family(relay_proc.pid))
        direct_proc = _start(lab, "pub2", [*span, "--initial-peers", *boot], logs / "direct.log")
        procs.append((direct_proc, {}))
        direct = _maddrs(direct_proc)
        procs[-1] = (direct_proc, family(direct_proc.pid))
        t0 = time.monotonic()
        nat_proc = _start(lab, "home1", [*span, "--initial-peers", *boot], logs / "relayed.log")
        procs.append((nat_proc, {}))
        nat = _maddrs(nat_proc)
        announced_s = time.monotonic() - t0
        procs[-1] = (nat_proc, family(nat_proc.pid))
        for log in ("relay.log", "direct.log", "relayed.log"):
            _wait_log(logs / log, "serving blocks", 180)
        peers = {"direct": _id(direct[0]), "relayed": _id(nat[0])}
        code = (
            "import asyncio, json, sys; from simulations.bench_nat import _measure; "
            "print(json.dumps(asyncio.run(_measure(*json.loads(sys.argv[1])))))"
        )
        arg = json.dumps([boot, model, peers, steps, pings])
        done = subprocess.run(
            [*lab.exec("home2"), sys.executable, "-c", code, arg],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=600,
            start_new_session=True,
        )
        if done.returncode != 0:
            raise RuntimeError(f"client failed:\n{done.stderr[-2000:]}")
        results = json.loads(done.stdout.strip().splitlines()[-1])
        results["relayed_maddrs_s"] = round(announced_s, 1)
        results["relayed_maddrs"] = nat
    finally:
        for proc, seen in procs:
            kill_tree(proc, seen)
        tag = lab.tag
        lab.close()
    if leftover_namespaces(tag):
        raise RuntimeError(f"namespaces left: {leftover_namespaces(tag)}")
    return results


def _num_layers(model: str) -> int:
    from swarm.model.loading import load_config, resolve_model

    return load_config(resolve_model(model)).num_layers


def _id(maddr: str) -> str:
    return maddr.rsplit("/p2p/", 1)[1]


def _wait_log(path: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in path.read_text(errors="replace"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path.name} never logged {text!r}")
        time.sleep(0.2)


def format_table(r: dict) -> str:
    lines = [
        f"model {r['model']}; {r['steps']} decoding steps (batch 1) through one peer serving "
        f"every block; {r['pings']} pings; client behind NAT; medians, interleaved",
        f"{'peer':<8} {'rtt ms':>7} {'p90 ms':>7} {'step ms':>8} {'p90 ms':>7} {'tok/s':>7}",
    ]
    for kind in ("direct", "relayed"):
        x = r[kind]
        lines.append(
            f"{kind:<8} {x['rtt_ms']:>7.2f} {x['rtt_p90_ms']:>7.2f} {x['step_ms']:>8.2f} "
            f"{x['step_p90_ms']:>7.2f} {x['tokens_per_s']:>7.1f}"
        )
    lines.append(
        f"relayed peer printed its circuit addrs {r['relayed_maddrs_s']:.1f} s after start"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.bench_nat",
        description=__doc__.split("\n\n")[0],
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("--model", default=None, help="model path (default: a tiny random one)")
    parser.add_argument("--steps", type=int, default=50, help="timed decoding steps per peer")
    parser.add_argument("--pings", type=int, default=30, help="round trips timed per peer")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    args = parser.parse_args()
    missing = missing_tools()
    if missing:
        sys.exit(f"bench_nat: needs {', '.join(missing)}")
    with scratch_dir("bench-nat-") as tmp:
        model = args.model
        if model is None:
            from swarm.tiny_checkpoint import write_tiny_checkpoint

            model = str(write_tiny_checkpoint(tmp / "tiny-llama"))
        results = run(model, args.steps, args.pings, tmp)
        results.update(model=args.model or "tiny (6 blocks, hidden 64)", steps=args.steps)
        results["pings"] = args.pings
    print(json.dumps(results) if args.json else format_table(results))


if __name__ == "__main__":
    main()
