"""Benchmark of SWARM training over real peer processes on 127.0.0.1, with and without churn.

The same 4 peers (2 stages x 2 replicas) train as SWARM (stochastic wiring, background averaging)
and as fixed pipelines (lane i always on replica i, lock-step all-reduce at the same target batch),
without churn and with a peer SIGKILLed every T s and restarted. Prints one line per scenario
(samples/s, loss, lost, kills) and the SWARM / pipelines ratios; --json prints JSON lines instead.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

from simulations.churn_harness import Proc, write_text
from simulations.cli_help import DefaultsHelpFormatter
from simulations.progress import Progress
from simulations.scratch import scratch_dir
from swarm.tiny_checkpoint import TINY_CONFIG, write_tiny_checkpoint

STEP_RE = re.compile(r"^step (\d+) loss (\S+) samples/s (\S+) retries (\d+)$", re.M)

# The bench model: the tests' tiny Llama, wider, with a byte vocabulary.
BENCH_CONFIG = {**TINY_CONFIG, "vocab_size": 256, "hidden_size": 128, "intermediate_size": 256}


def write_model(folder: Path) -> Path:
    return write_tiny_checkpoint(folder, BENCH_CONFIG, std=None)


class Swarm:
    def __init__(self, model: Path, run_id: str, workdir: Path, cache: Path):
        self.model, self.run_id, self.workdir = model, run_id, workdir
        self.env = {"SWARM_MESH_CACHE": str(cache)}
        self.peers: dict[str, Proc] = {}  # name -> process
        self.spans: dict[str, str] = {}
        self.maddr: str | None = None
        self.count = 0

    def start_peer(self, name: str, span: str) -> Proc:
        argv = [
            sys.executable,
            "-m",
            "swarm.cli.peer",
            "join",
            "--stage",
            span,
            "--model",
            str(self.model),
            "--train",
            "--run-id",
            self.run_id,
            "--quant",
            "none",
        ]
        # Every live peer's address: a restarted peer must not depend on one that was killed.
        live = [p.lines[0][1] for p in self.peers.values() if p.lines and p.running()]
        if live:
            argv += ["--initial-peers", *live]
        self.count += 1
        proc = Proc(argv, self.workdir / f"{self.run_id}-{name}-{self.count}.log", self.env)
        self.peers[name], self.spans[name] = proc, span
        if self.maddr is None:
            if not proc.got_line.wait(120):
                raise RuntimeError(f"first peer printed no multiaddr:\n{proc.log_text()[-2000:]}")
            self.maddr = proc.lines[0][1]
        return proc

    def wait_serving(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        for proc in self.peers.values():
            while "serving blocks" not in proc.log_text():
                if time.monotonic() > deadline or not proc.running():
                    raise RuntimeError(f"peer {proc.log_path} is not serving")
                time.sleep(0.5)
            proc.snapshot()  # its DHT fork and p2pd exist now: reap them by pid later

    def stop(self) -> None:
        for proc in self.peers.values():
            proc.kill()


def run_trainer(
    swarm: Swarm,
    text: Path,
    kill_every: float,
    workdir: Path,
    args: argparse.Namespace,
    mode: list[str],
    progress: Progress,
) -> dict:
    argv = [
        sys.executable,
        "-m",
        "swarm.cli.train",
        "--model",
        str(swarm.model),
        "--initial-peers",
        swarm.maddr,
        "--data",
        str(text),
        "--steps",
        str(args.steps),
        "--batch-size",
        str(args.batch_size),
        "--seq-len",
        str(args.seq_len),
        "--microbatches",
        str(args.microbatches),
        "--run-id",
        swarm.run_id,
        "--compression",
        args.codec,
        "--lr",
        "3e-3",
        "--warmup-steps",
        "0",
        "--max-attempts",
        "6",
        "--step-timeout",
        "60",
        *mode,
    ]
    trainer = Proc(argv, workdir / f"{swarm.run_id}-trainer.log")
    rng = random.Random(1)
    kills = 0
    next_kill = float("inf")  # the kill clock starts at the first step, once training runs
    t0 = time.monotonic()

    def status() -> str:
        done = sum(1 for _, x in trainer.lines if STEP_RE.match(x))
        churn = f", {kills} kills" if kill_every > 0 else ""
        return f"{swarm.run_id}: step {done}/{args.steps}{churn}"

    progress.update(status)
    while trainer.running() and time.monotonic() - t0 < args.max_wall:
        time.sleep(0.2)
        if kill_every > 0 and next_kill == float("inf"):
            if any(STEP_RE.match(x) for _, x in trainer.lines):
                next_kill = time.monotonic() + kill_every
        if time.monotonic() >= next_kill:
            name = rng.choice(sorted(swarm.peers))
            swarm.peers[name].kill()  # SIGKILL, then a fresh process takes its place
            swarm.start_peer(name, swarm.spans[name])
            kills += 1
            next_kill = time.monotonic() + kill_every
    wall = time.monotonic() - t0
    cut = trainer.running()  # still training at --max-wall: a stalled pipeline
    trainer.kill()
    matched = [(t, STEP_RE.match(x)) for t, x in trainer.lines]
    step_times = [t for t, m in matched if m]
    steps_seen = [m for _, m in matched if m]
    summary = next((x for _, x in trainer.lines if "lost=" in x), "")
    # Steady state: from the first step line to the last (start-up and DHT joins excluded).
    # A run cut off by max_wall before its last step (a stalled pipeline) counts up to the cut.
    end = step_times[-1] if summary or len(step_times) >= args.steps else t0 + wall
    span_s = end - step_times[0] if step_times else 0.0
    steady = (len(step_times) - 1) * args.batch_size / span_s if span_s > 0 else 0.0
    fields = dict(kv.split("=", 1) for kv in summary.split() if "=" in kv)
    samples = int(fields.get("samples", 0))
    bytes_per_sample = fields.get("wire_bytes_per_sample")
    return {
        "steps": len(steps_seen),
        "samples": samples,
        "wall_s": round(wall, 1),
        "samples_per_s": round(steady, 3),
        "samples_per_s_wall": round(samples / wall, 3) if wall else 0.0,
        "wire_bytes_per_sample": float(bytes_per_sample) if bytes_per_sample else None,
        "lost": int(fields["lost"]) if "lost" in fields else None,
        "retries": int(fields.get("retries", 0)),
        "kills": kills,
        "first_loss": float(steps_seen[0][2]) if steps_seen else None,
        "last_loss": float(steps_seen[-1][2]) if steps_seen else None,
        "finished": bool(summary),
        "cut_at_max_wall": cut,
        "exit_code": trainer.proc.returncode,
        "lines": [x for _, x in trainer.lines if STEP_RE.match(x)],
    }


# name -> (kill a peer every --kill-every s?, trainer flags)
SCENARIOS = {
    "swarm": (False, []),
    "pipelines": (False, ["--sync", "--wiring", "fixed"]),
    "swarm-churn": (True, []),
    "pipelines-churn": (True, ["--sync", "--wiring", "fixed"]),
}


# Loss against samples on the same data and target batch: --sync, asynchronous, DiLoCo.
CURVES = {
    "sync": ["--sync"],
    "async": [],
    "average-every-4": ["--average-every", "4"],
    "average-every-16": ["--average-every", "16"],
}


def scenario(
    name: str, args, workdir: Path, model: Path, text: Path, cache: Path, progress: Progress
) -> dict:
    churn, mode = SCENARIOS[name] if name in SCENARIOS else (False, CURVES[name])
    swarm = Swarm(model, f"bench-{name}", workdir, cache)
    try:
        progress.update(f"{name}: starting 4 peers (2 stages x 2 replicas)")
        for stage in ("0:3", "3:6"):
            for r in range(2):
                swarm.start_peer(f"{stage}-{r}", stage)
        swarm.wait_serving()
        kill_every = args.kill_every if churn else 0.0
        result = run_trainer(swarm, text, kill_every, workdir, args, mode, progress)
    finally:
        swarm.stop()
    result["scenario"] = name
    result["churn"] = churn
    result["losses"] = [float(m[2]) for m in STEP_RE.finditer("\n".join(result.pop("lines")))]
    progress.update(f"{name}: {describe(result, args)}")
    return result


def describe(r: dict, args: argparse.Namespace) -> str:
    """One readable line of a scenario's figures, with what makes the row special."""
    lost = "-" if r["lost"] is None else r["lost"]
    loss = "-" if r["first_loss"] is None else f"{r['first_loss']:.3f} -> {r['last_loss']:.3f}"
    line = (
        f"samples/s {r['samples_per_s']:6.2f}  steps {r['steps']:>3}/{args.steps}  lost {lost:>2}  "
        f"retries {r['retries']:>3}  kills {r['kills']:>2}  loss {loss}"
    )
    notes = []
    if r["cut_at_max_wall"] and r["steps"] >= args.steps:
        notes.append(
            f"every step done, no summary by --max-wall {args.max_wall:.0f} s: lost unknown"
        )
    elif r["cut_at_max_wall"]:
        notes.append(f"stalled: cut at --max-wall {args.max_wall:.0f} s, lost unknown")
    elif not r["finished"]:
        notes.append(f"trainer exited with {r['exit_code']} before its summary (see its log)")
    if r["churn"] and r["kills"] == 0:
        notes.append(f"no kill happened: it ended within --kill-every {args.kill_every:.0f} s")
    return line + (f"  ({'; '.join(notes)})" if notes else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.bench_training",
        description=__doc__.split("\n\n")[0],
        epilog="Progress goes to stderr every 10 s; each scenario takes about a minute or more "
        "(4 peer processes start first).",
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per scenario")
    parser.add_argument(
        "--batch-size", type=int, default=32, help="target batch (one trainer): samples per step"
    )
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument(
        "--kill-every",
        type=float,
        default=30.0,
        help="seconds between kills in the *-churn scenarios, from the first step",
    )
    parser.add_argument("--codec", default="none", help="wire codec of activations/gradients")
    parser.add_argument("--max-wall", type=float, default=300.0, help="seconds per scenario")
    parser.add_argument(
        "--only", nargs="*", default=None, choices=[*SCENARIOS, *CURVES], help="scenarios to run"
    )
    parser.add_argument("--png", default=None, help="draw the figures to this PNG")
    parser.add_argument("--json", action="store_true", help="one JSON object per scenario instead")
    parser.add_argument(
        "--workdir", default=None, help="keep logs here (default: a temp dir, removed at exit)"
    )
    parser.add_argument(
        "--curves",
        action="store_true",
        help="instead: loss against samples for --sync, asynchronous and DiLoCo (H=4, 16) "
        "and single-process training, on the same data and target batch",
    )
    args = parser.parse_args(argv)
    with Progress("bench_training") as progress, scratch_dir("bench_training_", args.workdir) as wd:
        try:
            return (curves if args.curves else compare)(args, wd, progress)
        except RuntimeError as e:
            print(f"bench_training: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("bench_training: interrupted; peers stopped, temp dir removed", file=sys.stderr)
            return 130


def _setup(workdir: Path) -> tuple[Path, Path, Path]:
    model = write_model(workdir / "bench-llama")
    text = write_text(workdir / "text.txt")
    cache = workdir / "cache"
    cache.mkdir(exist_ok=True)
    return model, text, cache


def compare(args: argparse.Namespace, workdir: Path, progress: Progress) -> int:
    model, text, cache = _setup(workdir)
    results = {}
    for name in SCENARIOS:
        if args.only and name not in args.only:
            continue
        results[name] = r = scenario(name, args, workdir, model, text, cache, progress)
        if args.json:
            print(json.dumps(r), flush=True)
    if not args.json:
        for name, r in results.items():
            print(f"{name:16s} {describe(r, args)}")
        for base in ("", "-churn"):
            sw, pl = results.get("swarm" + base), results.get("pipelines" + base)
            if sw and pl and pl["samples_per_s"] > 0:
                ratio = sw["samples_per_s"] / pl["samples_per_s"]
                print(f"swarm{base} / pipelines{base}: {ratio:.2f}x")
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        names = list(results)
        ax.bar(names, [results[n]["samples_per_s"] for n in names])
        ax.set_ylabel("samples/s")
        ax.set_title(f"target batch {args.batch_size}, a kill every {args.kill_every:.0f} s")
        fig.tight_layout()
        fig.savefig(args.png)
    return 0


def curves(args: argparse.Namespace, workdir: Path, progress: Progress) -> int:
    from swarm.training.reference import train_local

    model, text, cache = _setup(workdir)
    results = {"single-process": {"scenario": "single-process"}}
    progress.update(f"single-process: {args.steps} steps")
    results["single-process"]["losses"] = train_local(
        str(model), [str(text)], args.steps, args.batch_size, args.seq_len, 3e-3
    )
    for name in CURVES:
        if args.only and name not in args.only:
            continue
        results[name] = scenario(name, args, workdir, model, text, cache, progress)
    for name, r in results.items():
        losses = r["losses"]
        last5 = sum(losses[-5:]) / max(len(losses[-5:]), 1)
        r["mean_last5"] = round(last5, 4)
        if args.json:
            print(json.dumps(r), flush=True)
            continue
        speed = f"samples/s {r['samples_per_s']:6.2f}" if "samples_per_s" in r else " " * 16
        print(f"{name:17s} {speed}  steps {len(losses)}  mean loss of the last 5 {last5:.4f}")
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for name, r in results.items():
            xs = [args.batch_size * (i + 1) for i in range(len(r["losses"]))]
            ax.plot(xs, r["losses"], label=name)
        ax.set_xlabel("samples")
        ax.set_ylabel("loss")
        ax.set_title(f"2 stages x 2 replicas, target batch {args.batch_size}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
