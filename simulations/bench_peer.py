"""Peer benchmark on loopback: inference step latency through 1, 2, 3 peers vs the same blocks
run locally (overhead per hop), relayed by the client and pushed from peer to peer, and forward
throughput with and without the int8 wire codec.

Remote and local steps alternate, so load drifts hit both; each figure is a median, the overhead
the median of per-step differences. The fixed-cost row (one block through one peer vs that block
here) is the hop's transport and software with little compute noise.

Run: python -m simulations.bench_peer [--model PATH] [--steps N] [--json]; prints a table
(JSON with --json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from simulations.cli_help import DefaultsHelpFormatter
from simulations.progress import Progress
from simulations.scratch import scratch_dir
from swarm import loops, trace
from swarm.dht import make_dht
from swarm.peer.dht_view import fetch_swarm_async
from swarm.procs import family, kill_tree

REPO = Path(__file__).resolve().parents[1]
FORWARD_CODECS = ("none", "int8-block64")
ROWS = ("1_peers", "2_peers", "3_peers", "2_peers_push", "3_peers_push", "fixed_cost")
TIMELINE_ROW = "3_peers_push"  # the row --trace breaks down, stage by stage
# The stages a peer notes (swarm.trace), in the order they happen within a step.
STAGES = ("request", "push_accepted", "input", "compute_start", "compute_end", "pushed", "replied")


def timeline(steps: list[tuple[float, float]], hops: list[list[tuple[str, float]]]) -> dict:
    """When each hop reached each stage of the timed steps, in ms after the client sent the step
    (medians), and the derived costs: per hop its compute, the wait from its input to its
    compute (a thread hop), from its compute to its push, the push's transit to the next hop,
    and the last reply's return to the client."""
    at: dict[str, list[float]] = {}
    for start, end in steps:
        for i, events in enumerate(hops, 1):
            seen = {}
            for name, t in events:
                if start <= t <= end and name not in seen:
                    seen[name] = t
            for name, t in seen.items():
                at.setdefault(f"hop{i}_{name}", []).append((t - start) * 1e3)
        at.setdefault("client_reply", []).append((end - start) * 1e3)
    med = {k: round(statistics.median(v), 2) for k, v in at.items()}
    order = {f"hop{i}_{s}": (i, STAGES.index(s)) for i in range(1, 4) for s in STAGES}
    out = {k: med[k] for k in sorted(med, key=lambda k: order.get(k, (9, 0)))}
    for i in range(1, len(hops) + 1):
        h = f"hop{i}_"
        if {h + "compute_start", h + "compute_end", h + "input"} <= med.keys():
            out[h + "compute_ms"] = round(med[h + "compute_end"] - med[h + "compute_start"], 2)
            out[h + "input_to_compute_ms"] = round(med[h + "compute_start"] - med[h + "input"], 2)
        if i < len(hops) and {h + "compute_end", h + "pushed"} <= med.keys():
            out[h + "compute_to_push_ms"] = round(med[h + "pushed"] - med[h + "compute_end"], 2)
            nxt = f"hop{i + 1}_push_accepted"
            if nxt in med:
                out[h + "push_transit_ms"] = round(med[nxt] - med[h + "pushed"], 2)
    last = f"hop{len(hops)}_compute_end"
    if last in med:
        out["last_compute_to_client_ms"] = round(med["client_reply"] - med[last], 2)
    return out


def _start_peer(args: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "swarm.cli.peer", "join", *args],
        stdout=subprocess.PIPE,
        stderr=open(log, "wb"),
        cwd=REPO,
        start_new_session=True,  # its group holds the DHT's fork and p2pd: kill_tree reaps them
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
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


async def _relayed(sessions, x, pos: int):
    """One step through the chain, the client sending each hop's output to the next."""
    for sess in sessions:
        x = await sess.step(x, pos)
    return x


async def _pushed(sessions, x, pos: int):
    """One step through the chain, each peer pushing its output straight to the next (what
    generation does by default); every hop also answers us. The last hop's output."""
    steps = []
    for i, sess in enumerate(sessions):
        nxt = sessions[i + 1] if i + 1 < len(sessions) else None
        steps.append(
            sess.step(
                x,
                pos,
                pushed=i > 0,
                push_to=None if nxt is None else (str(nxt.peer), nxt.session_id),
                prev_peer=str(sessions[i - 1].peer) if i else "",
            )
        )
    return (await asyncio.gather(*steps))[-1]


async def _timed_steps(sessions, local, h: int, steps: int, chain=_relayed, sends=None) -> dict:
    """Remote and local steps interleaved (alternating which goes first) on same-shape inputs:
    medians of each and of their per-step differences, so drifting load cancels out.
    chain: how a step crosses the sessions (_relayed or _pushed); sends: a list that gets each
    timed remote step's (start, end) times (the trace's timeline)."""
    import torch

    remote, here = [], []
    await chain(sessions, torch.randn(1, 1, h), 0)  # warm-up step (position 0)
    local(torch.randn(1, 1, h), 0)
    for pos in range(1, steps + 1):
        for turn in (0, 1) if pos % 2 else (1, 0):
            x = torch.randn(1, 1, h)
            t0 = time.perf_counter()
            if turn == 0:
                await chain(sessions, x, pos)
                remote.append(time.perf_counter() - t0)
                if sends is not None:
                    sends.append((t0, t0 + remote[-1]))
            else:
                local(x, pos)
                here.append(time.perf_counter() - t0)
    for sess in sessions:
        await sess.close()
    diffs = [r - loc for r, loc in zip(remote, here, strict=True)]
    return {
        "step_ms": round(statistics.median(remote) * 1e3, 2),
        "local_step_ms": round(statistics.median(here) * 1e3, 2),
        "overhead_per_hop_ms": round(statistics.median(diffs) * 1e3 / len(sessions), 2),
    }


def _local_span(model, first: int, last: int, max_len: int):
    """A step function over blocks [first, last) of the local model, with its own caches."""
    import torch

    caches = model.span.new_caches(1, max_len)

    def step(x, pos):
        with torch.inference_mode():
            return model.span(x, pos, caches, first, last)

    return step


async def _bench(
    dht, model, prefix, spans, peer_ids, steps: int, batch_tokens: int, steps_of: dict
) -> dict:
    """The figures; steps_of gets TIMELINE_ROW's timed steps, (start, end) each."""
    import torch

    from swarm.peer import PeerClient

    p2p = await dht.replicate_p2p()
    h, n = model.config.hidden_size, model.config.num_layers
    results: dict = {}
    # The client's streams on the peers' direct channels (the default) and on libp2p, row by
    # row in turn, so that a load drift hits both.
    for _ in range(60):  # the online records, which announce the channels
        records = await fetch_swarm_async(dht, prefix, n, timeout=10.0)
        if set(peer_ids.values()) <= {r.peer_id for r in records if r.direct_port}:
            break
        await asyncio.sleep(0.5)
    clients = {"": PeerClient(p2p), "_libp2p": PeerClient(p2p, use_direct=False)}
    for c in clients.values():
        c.learn_addrs(records)
    for hops in (1, 2, 3):
        chain = _spans(n, hops)
        # Relayed, then (2 and 3 hops) pushed: fresh sessions and caches for each.
        for name, how in [("", _relayed)] + ([("_push", _pushed)] if hops > 1 else []):
            for suffix, client in clients.items():
                sessions = [
                    await client.open_inference(peer_ids[(s, e)], s, e, steps + 8) for s, e in chain
                ]
                local = _local_span(model, 0, n, steps + 8)
                row = f"{hops}_peers{name}{suffix}"
                sends = steps_of.setdefault(row, []) if row == TIMELINE_ROW else None
                results[row] = await _timed_steps(sessions, local, h, steps, how, sends)
    # One block through the first peer vs that block here: transport + software.
    first = _spans(n, 3)[0]
    for suffix, client in clients.items():
        sessions = [await client.open_inference(peer_ids[first], 0, 1, steps + 8)]
        results[f"fixed_cost{suffix}"] = await _timed_steps(
            sessions, _local_span(model, 0, 1, steps + 8), h, steps
        )
    if clients[""].direct_streams == 0:
        raise RuntimeError("no stream went on a direct channel: do the peers announce one?")
    client = clients["_libp2p"]
    # The transport's floor: a small unary round trip through both daemons (an info call).
    trips = []
    for _ in range(steps):
        t0 = time.perf_counter()
        await client.info(peer_ids[first])
        trips.append(time.perf_counter() - t0)
    results["p2p_round_trip_ms"] = round(statistics.median(trips) * 1e3, 2)
    pid = peer_ids[(0, n)]
    x = torch.randn(1, batch_tokens, h)
    for codec in FORWARD_CODECS:
        await client.forward(pid, x, 0, n, codec=codec)
        t0 = time.perf_counter()
        k = 5
        for _ in range(k):
            await client.forward(pid, x, 0, n, codec=codec)
        results[f"forward_tokens_per_s_{codec}"] = round(
            k * batch_tokens / (time.perf_counter() - t0), 1
        )
    return results


def format_table(results: dict) -> str:
    """The figures as lines a person reads: one row per chain length, then the forward rates."""
    lines = [
        f"model {results['model']}; {results['steps']} timed inference steps per chain, "
        "batch 1, one token per step",
        f"{'peers':>10} {'step ms':>8} {'local ms':>9} {'overhead/hop ms':>16}",
    ]
    for suffix, transport in (("", "direct channel"), ("_libp2p", "libp2p")):
        lines.append(f"client's streams on {transport}:")
        for row in ROWS:
            r = results[row + suffix]
            name = {"fixed_cost": "1 blk"}.get(row, row.split("_")[0])
            name += " push" if row.endswith("push") else ""
            lines.append(
                f"{name:>10} {r['step_ms']:>8.2f} {r['local_step_ms']:>9.2f} "
                f"{r['overhead_per_hop_ms']:>16.2f}"
            )
    lines.append("medians; overhead/hop: median of per-step (remote - local), steps interleaved")
    lines.append("push: each peer sends its output straight to the next (generation's default);")
    lines.append("peers push on each other's direct channels in both parts")
    lines.append(
        f"a small unary round trip through both daemons: {results['p2p_round_trip_ms']} ms"
    )
    rates = ", ".join(
        f"{codec} {results[f'forward_tokens_per_s_{codec}']:.0f}" for codec in FORWARD_CODECS
    )
    lines.append(f"forward of {results['batch_tokens']} tokens through one peer, tokens/s: {rates}")
    tl = results.get(f"timeline_{TIMELINE_ROW}")
    if tl:
        lines.append(f"{TIMELINE_ROW} (direct channel), ms after the client sent the step:")
        lines += [f"  {k:<28} {v:>8.2f}" for k, v in tl.items()]
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
    parser.add_argument("--steps", type=int, default=50, help="timed inference steps per chain")
    parser.add_argument("--batch-tokens", type=int, default=512, help="tokens per forward call")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    parser.add_argument(
        "--trace",
        action="store_true",
        help=f"the peers note each step's stages (swarm.trace): adds the {TIMELINE_ROW} row's "
        "timeline (ms after the client sent the step)",
    )
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
    for suffix in ("", "_libp2p"):
        for row in ROWS[:-1]:
            results[f"overhead_per_hop_ms_{row}{suffix}"] = results[row + suffix][
                "overhead_per_hop_ms"
            ]
        results[f"fixed_cost_per_hop_ms{suffix}"] = results[f"fixed_cost{suffix}"][
            "overhead_per_hop_ms"
        ]
    print(json.dumps(results) if args.json else format_table(results))


def run(args: argparse.Namespace, logs: Path, progress: Progress) -> dict:
    """Start the peers, measure, stop them (by process group and pid); the figures."""
    trace_dir = None
    if args.trace:
        trace_dir = logs / "trace"
        trace_dir.mkdir()

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
        env = {trace.ENV: str(trace_dir)} if trace_dir is not None else {}
        first = _start_peer(["--stage", "{}:{}".format(*wanted[0]), *common], logs / "p0.log", env)
        procs.append(first)
        boot = _maddr(first)
        for i, span in enumerate(wanted[1:], 1):
            procs.append(
                _start_peer(
                    ["--stage", "{}:{}".format(*span), "--initial-peers", boot, *common],
                    logs / f"p{i}.log",
                    env,
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
        steps_of: dict = {}
        results = loops.run(_wait_and_bench(dht, model, wanted, ids, args, steps_of))
        if trace_dir is not None:
            chain = [dict(zip(wanted, procs, strict=True))[span] for span in _spans(num_layers, 3)]
            results[f"timeline_{TIMELINE_ROW}"] = timeline(
                steps_of[TIMELINE_ROW], [trace.read_file(trace_dir, p.pid) for p in chain]
            )
        return results
    finally:
        progress.update("stopping the peers")
        if dht is not None:
            dht.shutdown()
        for proc in procs:
            kill_tree(proc, seen)


async def _wait_and_bench(dht, model, spans, ids, args, steps_of: dict) -> dict:
    from swarm.model.loading import resolve_model
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
    prefix = resolve_model(args.model).name
    return await _bench(dht, model, prefix, spans, ids, args.steps, args.batch_tokens, steps_of)


if __name__ == "__main__":
    main()
