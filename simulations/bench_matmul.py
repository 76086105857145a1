"""Benchmark of quantized matmuls by weight shape and rows M: fp32, int8 weight-only, LLM.int8()
(per-token int8 activations) and nf4, in microseconds per call, with the int8 crossover.

Run `python -m simulations.bench_matmul [--json]` (SmolLM2-135M's four shapes by default). The
weights stay hot in cache here; bench_local measures the same paths inside the whole model.
kernels.int8_matmul.WEIGHT_ONLY_MAX_TOKENS_CPU comes from this table and bench_local's rows.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import kernels

SHAPES = ((576, 576), (192, 576), (1536, 576), (576, 1536))  # (out, in) of q/o, k/v, up, down
ROWS = (1, 2, 4, 6, 8, 12, 16, 32)


def best_us(fn, calls: int, repeats: int) -> float:
    """Best-of-`repeats` mean microseconds per call over `calls` calls."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
    return best


@torch.inference_mode()
def measure(shape: tuple[int, int], m: int, calls: int, repeats: int) -> dict:
    n, k = shape
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=gen) * 0.02
    x = torch.randn(m, k, generator=gen)
    q8 = kernels.quantize_weight(w)
    q4 = kernels.quantize_4bit(w, "nf4")
    return {
        "shape": f"{n}x{k}",
        "m": m,
        "fp32_us": best_us(lambda: torch.nn.functional.linear(x, w), calls, repeats),
        "int8_weight_only_us": best_us(
            lambda: kernels.int8_linear(x, q8, path="weight-only"), calls, repeats
        ),
        "int8_llm_int8_us": best_us(
            lambda: kernels.int8_linear(x, q8, path="int8"), calls, repeats
        ),
        "nf4_us": best_us(lambda: kernels.fourbit_linear(x, q4), max(1, calls // 4), repeats),
        "auto_path": kernels.choose_path(m, q8, x.device),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=100, help="calls per timed run")
    p.add_argument("--repeats", type=int, default=5, help="timed runs (best is kept)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [measure(s, m, args.calls, args.repeats) for s in SHAPES for m in ROWS]
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return
    print(f"microseconds per call, best of {args.repeats}, {torch.get_num_threads()} threads")
    print(f"{'shape':<10}{'M':>4}{'fp32':>8}{'int8 wo':>9}{'LLM.int8':>10}{'nf4':>8}  auto")
    for r in rows:
        print(
            f"{r['shape']:<10}{r['m']:>4}{r['fp32_us']:>8.1f}{r['int8_weight_only_us']:>9.1f}"
            f"{r['int8_llm_int8_us']:>10.1f}{r['nf4_us']:>8.1f}  {r['auto_path']}"
        )
    for s in SHAPES:
        mine = [r for r in rows if r["shape"] == f"{s[0]}x{s[1]}"]
        wins = [r["m"] for r in mine if r["int8_llm_int8_us"] < r["int8_weight_only_us"]]
        print(f"{s[0]}x{s[1]}: LLM.int8() first beats weight-only at M = {min(wins, default='-')}")


if __name__ == "__main__":
    main()
