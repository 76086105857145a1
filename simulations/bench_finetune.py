"""Fine-tuning benchmark: LoRA, ptune and deep_ptune through local (int8) peers vs local peft.

Run `python -m simulations.bench_finetune [--json] [--png FILE]`; prints a table of samples/s,
bytes on the wire per step and held-out loss before and after, per method, and a loss-curve PNG.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from simulations.cli_help import DefaultsHelpFormatter
from simulations.progress import Progress

DATA = Path(__file__).parent / "data" / "orders.txt"
LR = {"lora": 3e-3, "ptune": 3e-2, "deep_ptune": 1e-2}


@dataclass
class Row:
    method: str
    where: str  # "swarm" or "local peft"
    samples_per_s: float = 0.0
    wire_bytes_per_step: float = 0.0
    heldout_before: float = 0.0
    heldout_after: float = 0.0
    reduction: float = 0.0  # 1 - after / before
    retries: int = 0
    lost: int = 0
    losses: list[float] = field(default_factory=list)


def run_swarm_method(args, boot, method: str, windows, log) -> Row:
    from petals_like.finetune import FinetuneConfig, finetune
    from petals_like.model import DistributedModelForCausalLM

    torch.manual_seed(args.seed)
    options = {"rank": args.rank, "targets": args.targets} if method == "lora" else {}
    options["pre_seq_len"] = args.pre_seq_len
    model = DistributedModelForCausalLM.from_pretrained(
        args.model, boot, compression=args.codec, tuning=method, **options
    )
    config = FinetuneConfig(
        steps=args.steps,
        lr=args.lr or LR[method],
        batch_size=args.batch_size,
        seq_len=args.seq_len,
    )
    try:
        t0 = time.monotonic()

        def on_step(s) -> None:
            log(f"{method}: step {s.step} loss {s.loss:.4f} ({s.samples_per_s:.2f} samples/s)")

        result = finetune(model, config, windows, on_step)
        elapsed = time.monotonic() - t0
    finally:
        model.close()
    h = result.history
    step_s = sum(config.batch_size / s.samples_per_s for s in h)
    row = Row(
        method,
        "swarm",
        samples_per_s=len(h) * config.batch_size / max(step_s, 1e-9),
        wire_bytes_per_step=sum(s.wire_bytes for s in h) / max(len(h), 1),
        heldout_before=result.heldout_before,
        heldout_after=result.heldout_after,
        reduction=1 - result.heldout_after / result.heldout_before,
        retries=result.retries,
        lost=result.lost,
        losses=[s.loss for s in h],
    )
    log(f"{method}: {elapsed:.0f} s, held-out {row.heldout_before:.3f} -> {row.heldout_after:.3f}")
    return row


def run_local_peft(args, source, windows, steps: int) -> Row:
    """The same LoRA trained locally with transformers + peft (fp32 weights): samples/s."""
    import transformers
    from peft import LoraConfig, get_peft_model

    from swarm.model.lora import target_name

    if source.kind == "gguf":
        base = transformers.AutoModelForCausalLM.from_pretrained(
            str(source.path.parent), gguf_file=source.path.name, dtype=torch.float32
        )
    else:
        base = transformers.AutoModelForCausalLM.from_pretrained(
            str(source.path), dtype=torch.float32
        )
    cfg = LoraConfig(
        r=args.rank, lora_alpha=16, target_modules=[target_name(t) for t in args.targets]
    )
    model = get_peft_model(base, cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR["lora"])
    times, losses = [], []
    for _ in range(steps):
        batch = windows.batch(args.batch_size)
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    best = sorted(times)[len(times) // 2]
    return Row("lora", "local peft", samples_per_s=args.batch_size / best, losses=losses)


def run_local_ours(args, source, windows, steps: int) -> Row:
    """The same LoRA trained on our own blocks in this process (fp32, hooks): samples/s."""
    from petals_like.tuning import RemoteTuning, TuningConfig
    from swarm.model import lora
    from swarm.model.loading import load_model

    model = load_model(source, progress=False)
    for p in model.parameters():
        p.requires_grad_(False)
    tc = TuningConfig("lora", rank=args.rank, targets=args.targets)
    tuning = RemoteTuning(model.config, tc)
    n = model.config.num_layers
    params: lora.BlockTensors = {}
    for b, name, p in tuning.named_block_params(0, n):
        params.setdefault(b, {})[name] = p
    blocks = list(enumerate(model.span.blocks))
    opt = torch.optim.AdamW(tuning.parameters(), lr=LR["lora"])
    times, losses = [], []
    for _ in range(steps):
        batch = windows.batch(args.batch_size)
        t0 = time.perf_counter()
        opt.zero_grad()
        with lora.applied(blocks, tuning.spec, params):
            logits = model(batch)
        v = logits.shape[-1]
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, v), batch[:, 1:].reshape(-1)
        )
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    best = sorted(times)[len(times) // 2]
    return Row("lora", "local ours", samples_per_s=args.batch_size / best, losses=losses)


def draw(rows: list[Row], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        if r.where == "swarm":
            ax.plot(range(1, len(r.losses) + 1), r.losses, label=r.method)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title("Fine-tuning through int8 peers")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m simulations.bench_finetune",
        description=__doc__.split("\n\n")[0],
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument("--model", default="smollm2-135m", help="model name or path")
    p.add_argument("--quant", default="int8", choices=("int8", "none"), help="peer weights")
    p.add_argument("--data", default=str(DATA), help="text to fine-tune on")
    p.add_argument("--methods", nargs="+", default=["lora", "ptune", "deep_ptune"], help="methods")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per method")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per sequence")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default per method)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--targets", nargs="+", default=["q", "k", "v", "o", "gate", "up", "down"])
    p.add_argument("--pre-seq-len", type=int, default=8, help="soft prompt length")
    p.add_argument("--codec", default="auto", help="activation codec on the wire")
    p.add_argument("--local-steps", type=int, default=6, help="local peft steps (speed only)")
    p.add_argument("--seed", type=int, default=0, help="seed of adapters and batches")
    p.add_argument("--png", default=None, help="write the loss curves here")
    p.add_argument("--json", action="store_true", help="also print one JSON object")
    args = p.parse_args(argv)
    with Progress("bench_finetune") as progress:
        try:
            bench(args, progress.update)
        except KeyboardInterrupt:
            print("bench_finetune: interrupted; peers stopped", file=sys.stderr)
            sys.exit(130)


def bench(args: argparse.Namespace, log) -> None:
    from petals_like.finetune import TokenWindows, tokenize_files
    from simulations.bench_inference import start_swarm
    from swarm.model.loading import load_config, load_tokenizer, resolve_model

    source = resolve_model(args.model)
    config = load_config(source)
    n = config.num_layers
    thirds = [f"{i * n // 3}:{(i + 1) * n // 3}" for i in range(3)]
    try:
        tokenizer = load_tokenizer(source)
    except Exception as e:  # a test checkpoint without one: bytes as tokens
        log(f"no tokenizer ({e}): UTF-8 bytes as tokens")
        tokenizer = None
    ids = tokenize_files([args.data], tokenizer, config.vocab_size)
    log(f"{args.model}: {n} blocks on 3 {args.quant} peers {thirds}; {len(ids)} tokens of data")
    rows: list[Row] = []
    swarm, boot = start_swarm(args.model, args.quant, thirds, n, source.name)
    try:
        for method in args.methods:
            windows = TokenWindows(ids, args.seq_len, 0.1, args.seed)
            rows.append(run_swarm_method(args, boot, method, windows, log))
    finally:
        swarm.close()
    if args.local_steps and "lora" in args.methods:
        log("local peft LoRA (fp32) for the speed baseline")
        windows = TokenWindows(ids, args.seq_len, 0.1, 0)
        rows.append(run_local_peft(args, source, windows, args.local_steps))
        log("local LoRA on our blocks (fp32)")
        rows.append(run_local_ours(args, source, windows, args.local_steps))
    print(
        f"{'method':<11} {'where':<10} {'samples/s':>9} {'wire/step':>10} {'held-out':>15} "
        f"{'drop':>6} {'retries':>7} lost"
    )
    for r in rows:
        held = f"{r.heldout_before:.3f}->{r.heldout_after:.3f}" if r.where == "swarm" else "-"
        if r.where != "swarm":
            r.losses = [round(x, 4) for x in r.losses]
        wire = f"{r.wire_bytes_per_step / 1e6:.2f} MB" if r.where == "swarm" else "-"
        drop = f"{r.reduction:.0%}" if r.where == "swarm" else "-"
        print(
            f"{r.method:<11} {r.where:<10} {r.samples_per_s:>9.2f} {wire:>10} {held:>15} "
            f"{drop:>6} {r.retries:>7} {r.lost}"
        )
    if args.png:
        draw(rows, args.png)
        print(f"loss curves: {args.png}")
    if args.json:
        print(
            json.dumps(
                {
                    "model": args.model,
                    "quant": args.quant,
                    "steps": args.steps,
                    "rows": [asdict(r) for r in rows],
                }
            )
        )


if __name__ == "__main__":
    main()
