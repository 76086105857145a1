"""Local benchmark: load time, decode tokens/s (batch 1, 4, 16), block memory and perplexity of
fp32, int8 and 4-bit (nf4, fp4, int4) blocks, all measured in one run.

4-bit modes are GPTQ-calibrated (swarm.model.calibrate, on text the fp32 model samples itself,
never the perplexity text); `nf4-rtn`, `fp4-rtn`, `int4-rtn` are round-to-nearest.
Run `python -m simulations.bench_local` (SmolLM2 by default); prints a table, or with --json one
JSON object per line per mode (mode, tok_s, tok_s_b1/b4/b16, ppl, bytes_per_param, calib_s...).
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
from swarm.model.calibrate import (
    LOAD_CALIBRATION,
    CalibrationConfig,
    quantize_calibrated,
    sample_calibration_ids,
)
from swarm.model.int8 import DEFAULT_THRESHOLD, Int8Linear, weight_bytes
from swarm.model.llama import LlamaModel
from swarm.model.loading import DEFAULT_MODEL, load_model, load_tokenizer, resolve_model
from swarm.model.quantize import quantized_params

TEXT = Path(__file__).parent / "data" / "pride_and_prejudice_ch1.txt"
PROMPT = "It was a bright cold day in April, and"
CALIBRATED = ("nf4", "fp4", "int4")  # GPTQ-calibrated; "<kind>-rtn" is round-to-nearest
MODES = ("fp32", "int8", *CALIBRATED, *(f"{k}-rtn" for k in CALIBRATED))
BATCHES = (1, 4, 16)
# (row name, outlier threshold, matmul path, note): the int8 model with one path forced.
INT8_VARIANTS = (
    (
        "int8/llm.int8",
        DEFAULT_THRESHOLD,
        "int8",
        f"LLM.int8() at every batch (t={DEFAULT_THRESHOLD})",
    ),
    ("int8/no-outliers", 0.0, "int8", "LLM.int8() without the outlier split (t=0)"),
    ("int8/weight-only", DEFAULT_THRESHOLD, "weight-only", "weight-only at every batch size"),
)


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


def set_int8_options(model: LlamaModel, threshold: float, path: str) -> None:
    for m in model.modules():
        if isinstance(m, Int8Linear):
            m.threshold, m.path = threshold, path


@torch.inference_mode()
def decode_speed(model: LlamaModel, prompt: list[int], new_tokens: int, batch: int = 1) -> float:
    """Greedy decode tokens/s over `batch` sequences (prefill excluded), one timed run."""
    caches = model.new_caches(batch, len(prompt) + new_tokens + 1)
    nxt = model(torch.tensor([prompt] * batch), 0, caches)[:, -1:].argmax(-1)
    pos = len(prompt)
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        nxt = model(nxt, pos, caches)[:, -1:].argmax(-1)
        pos += 1
    return batch * new_tokens / (time.perf_counter() - t0)


def calib_note(calib: CalibrationConfig) -> str:
    names = "/".join(
        n.rsplit(".", 1)[-1] if ":" not in n else n.replace("mlp.", "").replace("self_attn.", "")
        for n in calib.int8
    )
    int8 = f", {names} int8" if calib.int8 else ""
    keep = f", {100 * calib.keep:g}% columns fp16" if calib.keep else ""
    seq = "" if calib.sequential else ", non-sequential"
    seq += ", scales re-fit" if calib.refine else ""
    return f"GPTQ on {calib.sequences}x{calib.length} sampled tokens{int8}{keep}{seq}"


def measure(args: argparse.Namespace, progress: Progress) -> tuple[list[dict], Path, list[int]]:
    """One row per mode (and the int8 path variants), the model's source and the text's ids.

    Every model is loaded first; decode speed is then timed in rounds, each round running every
    row once, and the best round of each row is kept: a load that comes and goes on a shared
    machine then slows every row alike instead of whichever happened to run at that moment.
    """
    source = resolve_model(args.model)
    tok = load_tokenizer(source)
    ids = tok.encode(args.text.read_text(encoding="utf-8"))
    prompt = tok.encode(PROMPT)
    rows, models = [], []  # models[i]: (model, int8 threshold, int8 path) of rows[i]
    calib = CalibrationConfig(
        sequences=args.calib_sequences,
        length=args.calib_length,
        int8=tuple(args.calib_int8),
        keep=args.calib_keep,
        seed=args.calib_seed,
        sequential=args.calib_sequential,
        temperature=args.calib_temperature,
        top_p=args.calib_top_p,
        refine=args.calib_refine,
        true_sequential=args.calib_true_sequential,
    )
    calib_ids, sample_s = None, 0.0  # sampled once, shared by every calibrated mode
    for mode in args.modes:
        progress.update(f"loading {source.name} ({mode} block weights)")
        rss0 = rss_mb()
        t0 = time.perf_counter()
        quant = "none" if mode in ("fp32", *CALIBRATED) else mode
        model = load_model(source, quant=quant, progress=False)
        load_s = time.perf_counter() - t0
        calib_s = None
        if mode in CALIBRATED:
            if calib_ids is None:
                progress.update(f"sampling {calib.sequences}x{calib.length} calibration tokens")
                t1 = time.perf_counter()
                calib_ids = sample_calibration_ids(
                    model,
                    calib.sequences,
                    calib.length,
                    calib.seed,
                    calib.temperature,
                    calib.top_p,
                )
                sample_s = time.perf_counter() - t1
            progress.update(f"{mode}: GPTQ calibration")
            t1 = time.perf_counter()
            quantize_calibrated(model, mode, calib, ids=calib_ids)
            calib_s = sample_s + time.perf_counter() - t1
        rss1 = rss_mb()
        row = {
            "mode": mode,
            "load_s": load_s,
            "calib_s": calib_s,
            "block_weights_mb": weight_bytes(model.span) / 2**20,
            "bytes_per_param": weight_bytes(model.span) / quantized_params(model.span),
            "rss_delta_mb": rss1 - rss0 if rss0 is not None and rss1 is not None else None,
            "note": calib_note(calib) if mode in CALIBRATED else "",
        }
        rows.append(row)
        models.append((model, DEFAULT_THRESHOLD, "auto"))
        if mode == "int8" and args.int8_variants:
            # The same loaded weights with one matmul path forced: no load or memory of their own.
            for name, threshold, path, note in INT8_VARIANTS:
                rows.append(dict(row, mode=name, load_s=None, rss_delta_mb=None, note=note))
                models.append((model, threshold, path))
    for row, (model, threshold, path) in zip(rows, models, strict=True):
        progress.update(f"{row['mode']}: warming up")
        set_int8_options(model, threshold, path)
        decode_speed(model, prompt, 2, 1)  # first calls allocate and fill caches: not timed
    for r in range(args.repeats):
        for row, (model, threshold, path) in zip(rows, models, strict=True):
            set_int8_options(model, threshold, path)
            for b in BATCHES:
                progress.update(
                    f"round {r + 1}/{args.repeats}: {row['mode']} decoding at batch {b}"
                )
                speed = decode_speed(model, prompt, args.max_new_tokens, b)
                row[f"tok_s_b{b}"] = max(row.get(f"tok_s_b{b}", 0.0), speed)
    for row, (model, threshold, path) in zip(rows, models, strict=True):
        set_int8_options(model, threshold, path)
        progress.update(f"{row['mode']}: perplexity over {len(ids)} tokens")
        row.update(tok_s=row["tok_s_b1"], ppl=perplexity(model, ids, args.window))
    return rows, source, ids


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--text", type=Path, default=TEXT, help="text for perplexity")
    p.add_argument("--window", type=int, default=512, help="tokens per perplexity window")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (best kept)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument(
        "--no-int8-variants",
        dest="int8_variants",
        action="store_false",
        help="skip the rows of the int8 model with one matmul path forced",
    )
    p.add_argument(
        "--calib-sequences",
        type=int,
        default=CalibrationConfig.sequences,
        help="calibration: sequences the fp32 model samples",
    )
    p.add_argument(
        "--calib-length",
        type=int,
        default=CalibrationConfig.length,
        help="calibration: tokens per sampled sequence",
    )
    p.add_argument(
        "--calib-int8",
        nargs="*",
        default=list(CalibrationConfig.int8),
        help="calibration: block linear layers kept in int8 (e.g. self_attn.v_proj, or "
        "1:mlp.down_proj for block 1's only)",
    )
    p.add_argument("--calib-seed", type=int, default=CalibrationConfig.seed)
    p.add_argument("--calib-temperature", type=float, default=CalibrationConfig.temperature)
    p.add_argument("--calib-top-p", type=float, default=CalibrationConfig.top_p)
    p.add_argument(
        "--calib-sequential",
        action=argparse.BooleanOptionalAction,
        default=LOAD_CALIBRATION.sequential,
        help="calibrate each block on the quantized earlier blocks' outputs (default --no-...: "
        "on the fp32 ones, as loading does so that a peer's codes equal a local model's)",
    )
    p.add_argument(
        "--calib-refine",
        action=argparse.BooleanOptionalAction,
        default=CalibrationConfig.refine,
        help="re-fit the block scales to the GPTQ codes (least output error)",
    )
    p.add_argument(
        "--calib-true-sequential",
        action=argparse.BooleanOptionalAction,
        default=CalibrationConfig.true_sequential,
        help="within a block, each layer's Hessian through the layers quantized before it",
    )
    p.add_argument(
        "--calib-keep",
        type=float,
        default=CalibrationConfig.keep,
        help="calibration: fraction of input columns kept in float16",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per line per mode")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with Progress("bench_local") as progress:
        rows, source, ids = measure(args, progress)
    fp32 = next((r["ppl"] for r in rows if r["mode"] == "fp32"), rows[0]["ppl"])
    fp32_tok_s = next((r["tok_s"] for r in rows if r["mode"] == "fp32"), rows[0]["tok_s"])
    for row in rows:
        row["ppl_vs_fp32_pct"] = 100 * (row["ppl"] / fp32 - 1)
        row["tok_s_vs_fp32"] = row["tok_s"] / fp32_tok_s
        row.update(model=source.name, text_tokens=len(ids), threads=torch.get_num_threads())
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return
    print(
        f"model {source.name}; perplexity on {args.text.name} ({len(ids)} tokens); "
        f"{args.max_new_tokens} new tokens, best of {args.repeats}, "
        f"{torch.get_num_threads()} threads"
    )
    head = f"{'mode':<18}{'load s':>7}{'calib s':>8}{'tok/s':>7}{'x fp32':>7}{'b4':>7}{'b16':>7}"
    head += f"{'blocks MB':>10}{'B/param':>8}{'RSS+ MB':>8}{'ppl':>8}{'vs fp32':>9}"
    print(head)
    for r in rows:
        load = "-" if r["load_s"] is None else f"{r['load_s']:.2f}"
        calib = "-" if r["calib_s"] is None else f"{r['calib_s']:.1f}"
        rss = "-" if r["rss_delta_mb"] is None else f"{r['rss_delta_mb']:.0f}"
        print(
            f"{r['mode']:<18}{load:>7}{calib:>8}{r['tok_s']:>7.1f}{r['tok_s_vs_fp32']:>6.2f}x"
            f"{r['tok_s_b4']:>7.1f}{r['tok_s_b16']:>7.1f}"
            f"{r['block_weights_mb']:>10.1f}{r['bytes_per_param']:>8.3f}"
            f"{rss:>8}{r['ppl']:>8.3f}{r['ppl_vs_fp32_pct']:>+8.2f}%"
            + (f"  ({r['note']})" if r["note"] else "")
        )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
