"""Verification benchmark: decode tokens/s through local peers with --verify off, default and 1.

Run `python -m simulations.bench_verify [--json]`; every span has two replicas so that each hop
can be checked. Prints one table (and one JSON object with --json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from petals_like.verify import DEFAULT_FRACTION
from simulations.bench_inference import source_blocks, start_swarm
from simulations.cli_help import DefaultsHelpFormatter

PROMPT = [5, 17, 42, 8, 60, 11, 99, 23, 7, 7, 30, 2]


def measure(model_name, boot, fractions, new, repeats, compression, log) -> dict:
    """Decode tokens/s per fraction; runs interleaved so that the machine's load drifts evenly."""
    from petals_like.model import DistributedModelForCausalLM

    runs: dict[float, list[dict]] = {f: [] for f in fractions}
    with DistributedModelForCausalLM.from_pretrained(
        model_name, boot, compression=compression, load_tokenizer=False
    ) as model:
        model.generate(PROMPT, max_new_tokens=4, stop_on_eos=False)  # dial every peer once
        for r in range(repeats):
            for f in fractions:
                model.verify = f
                out = model.generate(PROMPT, max_new_tokens=new, stop_on_eos=False)
                st = model.last_stats
                runs[f].append(
                    {
                        "tokens_per_s": st.decode_tokens_per_s,
                        "total_s": st.total_s,
                        "checks": st.verify_checks,
                        "liars": len(st.liars),
                        "tokens": out[0, len(PROMPT) :].tolist(),
                    }
                )
                log(f"run {r + 1}/{repeats} verify {f:g}: {st.decode_tokens_per_s:.1f} tok/s")
    base = statistics.median(x["tokens_per_s"] for x in runs[fractions[0]])
    rows = []
    for f in fractions:
        tps = statistics.median(x["tokens_per_s"] for x in runs[f])
        rows.append(
            {
                "verify": f,
                "tokens_per_s": tps,
                "best_tokens_per_s": max(x["tokens_per_s"] for x in runs[f]),
                "cost": 1.0 - tps / base if base else 0.0,
                "hop_checks_per_run": statistics.mean(x["checks"] for x in runs[f]),
                "liars": sum(x["liars"] for x in runs[f]),
                "same_tokens": all(x["tokens"] == runs[fractions[0]][0]["tokens"] for x in runs[f]),
            }
        )
    return {"rows": rows}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m simulations.bench_verify",
        description=__doc__.splitlines()[0],
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument("--model", default="smollm2-135m", help="model name or path")
    p.add_argument(
        "--spans", default=None, help="comma-separated spans, each served twice (none: halves)"
    )
    p.add_argument("--quant", default="int8", help="block weights of the peers")
    p.add_argument("--compression", default="auto", help="activation codec on the wire")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per run")
    p.add_argument("--repeats", type=int, default=3, help="runs per fraction (the median kept)")
    p.add_argument(
        "--fractions",
        default=f"0,{DEFAULT_FRACTION:g},1",
        help="verify fractions measured; the first is the baseline",
    )
    p.add_argument("--json", action="store_true", help="also print one JSON object")
    args = p.parse_args(argv)

    def log(msg: str) -> None:
        print(f"[bench_verify] {msg}", file=sys.stderr, flush=True)

    from swarm.model.loading import resolve_model

    source = resolve_model(args.model)
    n = source_blocks(source)
    spans = args.spans.split(",") if args.spans else [f"0:{n // 2}", f"{n // 2}:{n}"]
    fractions = [float(f) for f in args.fractions.split(",")]
    log(f"starting {2 * len(spans)} peers: {spans}, each twice")
    t0 = time.monotonic()
    swarm, boot = start_swarm(args.model, args.quant, [s for s in spans for _ in (0, 1)], n,
                              source.name)  # fmt: skip
    try:
        log(f"swarm up in {time.monotonic() - t0:.0f} s")
        result = measure(
            args.model, boot, fractions, args.new_tokens, args.repeats, args.compression, log
        )
    finally:
        swarm.close()
    result.update(
        model=source.name, spans=spans, quant=args.quant, compression=args.compression,
        new_tokens=args.new_tokens, repeats=args.repeats,
    )  # fmt: skip
    print(f"{'verify':>6} {'tok/s':>7} {'best':>7} {'cost':>6} {'checks/run':>10}  same tokens")
    for r in result["rows"]:
        print(
            f"{r['verify']:>6g} {r['tokens_per_s']:>7.1f} {r['best_tokens_per_s']:>7.1f} "
            f"{r['cost'] * 100:>5.1f}% {r['hop_checks_per_run']:>10.1f}  {r['same_tokens']}"
        )
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
