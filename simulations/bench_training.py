"""Benchmark of SWARM training over real peer processes on 127.0.0.1, with and without churn.

Figures: samples/s (2 stages x 2 replicas, no churn / a replica SIGKILLed every T s and restarted),
wire bytes per sample (fp32 vs int8), and a fixed pipeline (1 peer per stage) under the same kills.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEP_RE = re.compile(r"^step (\d+) loss (\S+) samples/s (\S+) retries (\d+)$")

TINY = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 256,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def write_model(folder: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    from swarm.model import LlamaModel, ModelConfig

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = LlamaModel(ModelConfig.from_hf(TINY))
    tensors = {f"model.layers.{k}": v for k, v in model.span.blocks.state_dict().items()}
    tensors["model.embed_tokens.weight"] = model.client.embed_tokens.weight
    tensors["model.norm.weight"] = model.client.norm.weight
    tensors["lm_head.weight"] = model.client.lm_head.weight
    save_file(
        {k: v.detach().clone().contiguous() for k, v in tensors.items()},
        str(folder / "model.safetensors"),
    )
    (folder / "config.json").write_text(json.dumps(TINY))
    return folder


def write_text(path: Path) -> Path:
    rng = random.Random(0)
    words = "the quick brown fox jumps over the lazy dog while peers train a model".split()
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(400)))
    return path


class Proc:
    """A subprocess in its own session, killed by process group."""

    def __init__(self, argv: list[str], log: Path, env: dict | None = None):
        self.log = open(log, "wb")
        self.lines: list[str] = []
        self.times: list[float] = []
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=self.log,
            cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            start_new_session=True,
        )
        self.got_line = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for raw in self.proc.stdout:
            self.lines.append(raw.decode(errors="replace").strip())
            self.times.append(time.monotonic())
            self.got_line.set()

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        self.log.close()


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
        ]
        if self.maddr:
            argv += ["--initial-peers", self.maddr]
        self.count += 1
        proc = Proc(argv, self.workdir / f"{self.run_id}-{name}-{self.count}.log", self.env)
        self.peers[name], self.spans[name] = proc, span
        if self.maddr is None:
            if not proc.got_line.wait(120):
                raise RuntimeError("first peer printed no multiaddr")
            self.maddr = proc.lines[0]
        return proc

    def wait_serving(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        for proc in self.peers.values():
            while "serving blocks" not in Path(proc.log.name).read_text(errors="replace"):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"peer {proc.log.name} is not serving")
                time.sleep(0.5)

    def stop(self) -> None:
        for proc in self.peers.values():
            proc.kill()


def run_trainer(
    swarm: Swarm,
    text: Path,
    steps: int,
    compression: str,
    kill_every: float,
    workdir: Path,
    batch: int,
    seq_len: int,
    max_wall: float,
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
        str(steps),
        "--batch-size",
        str(batch),
        "--seq-len",
        str(seq_len),
        "--microbatches",
        "4",
        "--run-id",
        swarm.run_id,
        "--compression",
        compression,
        "--lr",
        "3e-3",
        "--max-attempts",
        "6",
        "--step-timeout",
        "60",
    ]
    trainer = Proc(argv, workdir / f"{swarm.run_id}-trainer.log")
    rng = random.Random(1)
    kills = 0
    next_kill = time.monotonic() + kill_every if kill_every > 0 else float("inf")
    t0 = time.monotonic()
    while trainer.proc.poll() is None and time.monotonic() - t0 < max_wall:
        time.sleep(0.2)
        if time.monotonic() >= next_kill:
            name = rng.choice(sorted(swarm.peers))
            swarm.peers[name].kill()  # SIGKILL, then a fresh process takes its place
            swarm.start_peer(name, swarm.spans[name])
            kills += 1
            next_kill = time.monotonic() + kill_every
    wall = time.monotonic() - t0
    trainer.kill()
    matched = [(t, STEP_RE.match(x)) for t, x in zip(trainer.times, trainer.lines, strict=True)]
    step_times = [t for t, m in matched if m]
    steps_seen = [m for _, m in matched if m]
    # Steady state: from the first step line to the last (start-up and DHT joins excluded).
    # A run cut off by max_wall (a stalled pipeline) counts its time up to the cut.
    end = step_times[-1] if summary_seen(trainer) else t0 + wall
    span_s = end - step_times[0] if step_times else 0.0
    steady = (len(step_times) - 1) * batch / span_s if span_s > 0 else 0.0
    summary = next((x for x in trainer.lines if "lost=" in x), "")
    fields = dict(kv.split("=", 1) for kv in summary.split() if "=" in kv)
    samples = int(fields.get("samples", 0))
    return {
        "steps": len(steps_seen),
        "samples": samples,
        "wall_s": round(wall, 1),
        "samples_per_s": round(steady, 3),
        "samples_per_s_wall": round(samples / wall, 3) if wall else 0.0,
        "wire_bytes_per_sample": float(fields.get("wire_bytes_per_sample", "nan")),
        "lost": int(fields["lost"]) if "lost" in fields else None,
        "retries": int(fields.get("retries", 0)),
        "kills": kills,
        "first_loss": float(steps_seen[0][2]) if steps_seen else None,
        "last_loss": float(steps_seen[-1][2]) if steps_seen else None,
        "finished": bool(summary),
    }


def summary_seen(trainer: Proc) -> bool:
    return any("lost=" in x for x in trainer.lines)


def scenario(
    name: str, replicas: int, compression: str, kill_every: float, args, workdir, model, text, cache
) -> dict:
    swarm = Swarm(model, f"bench-{name}", workdir, cache)
    try:
        for stage in ("0:3", "3:6"):
            for r in range(replicas):
                swarm.start_peer(f"{stage}-{r}", stage)
        swarm.wait_serving()
        result = run_trainer(
            swarm,
            text,
            args.steps,
            compression,
            kill_every,
            workdir,
            args.batch_size,
            args.seq_len,
            args.max_wall,
        )
    finally:
        swarm.stop()
    result["scenario"] = name
    print(json.dumps(result), flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--kill-every", type=float, default=20.0, help="seconds between kills")
    parser.add_argument("--codec", default="int8-block64")
    parser.add_argument("--max-wall", type=float, default=240.0, help="seconds per scenario")
    parser.add_argument("--only", nargs="*", default=None, help="scenario names to run")
    parser.add_argument("--png", default=None, help="draw the figures to this PNG")
    parser.add_argument("--json", action="store_true", help="print one JSON object at the end")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="bench_training_"))
    model = write_model(workdir / "bench-llama")
    text = write_text(workdir / "text.txt")
    cache = workdir / "cache"
    cache.mkdir()
    plans = {
        "swarm": (2, "none", 0.0),
        "swarm-int8": (2, args.codec, 0.0),
        "swarm-churn": (2, "none", args.kill_every),
        "pipeline-churn": (1, "none", args.kill_every),
    }
    results = {}
    for name, (replicas, codec, kill) in plans.items():
        if args.only and name not in args.only:
            continue
        results[name] = scenario(name, replicas, codec, kill, args, workdir, model, text, cache)
    for name, r in results.items():
        print(
            f"{name:15s} samples/s {r['samples_per_s']:.2f}  steps {r['steps']}/{args.steps}  "
            f"bytes/sample {r['wire_bytes_per_sample']:.0f}  lost {r['lost']}  "
            f"kills {r['kills']}  loss {r['first_loss']} -> {r['last_loss']}"
        )
    if args.json:
        print(json.dumps(results))
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
        names = list(results)
        ax[0].bar(names, [results[n]["samples_per_s"] for n in names])
        ax[0].set_ylabel("samples/s")
        ax[1].bar(names, [results[n]["wire_bytes_per_sample"] for n in names])
        ax[1].set_ylabel("wire bytes / sample")
        for a in ax:
            a.tick_params(axis="x", rotation=30)
        fig.tight_layout()
        fig.savefig(args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
