"""Local benchmark: load time, tokens/s, block memory and perplexity of fp32 vs LLM.int8() blocks.

Run `python -m simulations.bench_local` (SmolLM2 by default); prints a table, or JSON with --json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from simulations.progress import Progress
from swarm.generation import SamplingConfig, generate_local
from swarm.model.int8 import Int8Linear, weight_bytes
from swarm.model.llama import LlamaModel
from swarm.model.loading import DEFAULT_MODEL, load_model, load_tokenizer, resolve_model

TEXT = Path(__file__).parent / "data" / "pride_and_prejudice_ch1.txt"
PROMPT = "It was a bright cold day in April, and"


def rss_mb() -> float | None:
    """Resident memory of this process now, from /proc (Linux); None where there is no /proc."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * 4096 / 2**20


@torch.inference_mode()
def perplexity(model: LlamaModel, ids: list[int], window: int) -> float:
    """exp(mean next-token NLL) over `ids`, in non-overlapping windows of `window` tokens."""
    nll, count = 0.0, 0
    for s in range(0, len(ids) - 1, window):
        chunk = torch.tensor([ids[s : s + window + 1]])
        logits = model(chunk[:, :-1]).float()
        loss = torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum")
        nll, count = nll + loss.item(), count + chunk.shape[1] - 1
    return math.exp(nll / count)


def set_threshold(model: LlamaModel, threshold: float) -> None:
    for m in model.modules():
        if isinstance(m, Int8Linear):
            m.threshold = threshold


def decode_speed(model: LlamaModel, prompt: list[int], new_tokens: int, repeats: int) -> float:
    """Best-of-`repeats` decode tokens/s (excluding the prefill step)."""
    best = 0.0
    for _ in range(repeats):
        stamps: list[float] = []
        generate_local(
            model,
            None,
            prompt,
            new_tokens,
            SamplingConfig(),
            stop_on_eos=False,
            on_token=lambda _t, s=stamps: s.append(time.perf_counter()),
        )
        if len(stamps) > 1:
            best = max(best, (len(stamps) - 1) / (stamps[-1] - stamps[0]))
    return best


def measure(args: argparse.Namespace, progress: Progress) -> tuple[list[dict], Path, list[int]]:
    """The table's rows (fp32, int8, int8 without outliers), the model's source and text ids."""
    source = resolve_model(args.model)
    tok = load_tokenizer(source)
    ids = tok.encode(args.text.read_text(encoding="utf-8"))
    prompt = tok.encode(PROMPT)
    rows = []
    for quant in ("none", "int8"):
        progress.update(f"loading {source.name} ({quant} block weights)")
        rss0 = rss_mb()
        t0 = time.perf_counter()
        model = load_model(source, quant=quant, progress=False)
        load_s = time.perf_counter() - t0
        params = sum(
            m.codes.numel() if isinstance(m, Int8Linear) else 0 for m in model.span.modules()
        ) + sum(p.numel() for p in model.span.parameters())
        mode = "fp32" if quant == "none" else "int8 (t=6.0)"
        progress.update(f"{mode}: decoding {args.max_new_tokens} tokens x {args.repeats}")
        tokens_per_s = decode_speed(model, prompt, args.max_new_tokens, args.repeats)
        rss1 = rss_mb()
        progress.update(f"{mode}: perplexity over {len(ids)} tokens")
        row = {
            "mode": mode,
            "load_s": load_s,
            "tokens_per_s": tokens_per_s,
            "block_weights_mb": weight_bytes(model.span) / 2**20,
            "bytes_per_param": weight_bytes(model.span) / params,
            "rss_delta_mb": rss1 - rss0 if rss0 is not None and rss1 is not None else None,
            "ppl": perplexity(model, ids, args.window),
            "note": "",
        }
        rows.append(row)
        if quant == "int8":
            # The same loaded weights with outlier threshold 0: no load and no memory of its own.
            set_threshold(model, 0.0)
            progress.update("int8 (no outliers): decoding and perplexity")
            rows.append(
                dict(
                    row,
                    mode="int8 (no outliers)",
                    load_s=None,
                    tokens_per_s=decode_speed(model, prompt, args.max_new_tokens, args.repeats),
                    rss_delta_mb=None,
                    ppl=perplexity(model, ids, args.window),
                    note="the int8 model above with threshold 0: load and RSS not its own",
                )
            )
        del model
    return rows, source, ids


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--text", type=Path, default=TEXT, help="text for perplexity")
    p.add_argument("--window", type=int, default=512, help="tokens per perplexity window")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with Progress("bench_local") as progress:
        rows, source, ids = measure(args, progress)
    fp32 = rows[0]["ppl"]
    for row in rows:
        row["ppl_vs_fp32_pct"] = 100 * (row["ppl"] / fp32 - 1)
    if args.json:
        print(json.dumps({"model": source.name, "text_tokens": len(ids), "rows": rows}))
        return
    print(
        f"model {source.name}; perplexity on {args.text.name} ({len(ids)} tokens); "
        f"{args.max_new_tokens} new tokens, {torch.get_num_threads()} threads"
    )
    head = f"{'mode':<20}{'load s':>8}{'tok/s':>8}{'blocks MB':>11}{'B/param':>9}"
    head += f"{'RSS+ MB':>9}{'ppl':>9}{'vs fp32':>9}"
    print(head)
    for r in rows:
        load = "-" if r["load_s"] is None else f"{r['load_s']:.2f}"
        rss = "-" if r["rss_delta_mb"] is None else f"{r['rss_delta_mb']:.0f}"
        print(
            f"{r['mode']:<20}{load:>8}{r['tokens_per_s']:>8.1f}"
            f"{r['block_weights_mb']:>11.1f}{r['bytes_per_param']:>9.3f}"
            f"{rss:>9}{r['ppl']:>9.3f}{r['ppl_vs_fp32_pct']:>+8.2f}%"
            + (f"  ({r['note']})" if r["note"] else "")
        )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
