"""Wire codec benchmark: greedy agreement with --local and tokens/s per codec, and what auto picks.

Run `python -m simulations.bench_codec [--json]`: a local swarm of int8 peers for each of --links
(every link, peers' and client's, capped at that many Mbit/s; 0: unlimited); prints one table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

from simulations.cli_help import DefaultsHelpFormatter
from simulations.demo_swarm import start_local_swarm
from simulations.progress import Progress

DEFAULT_CODECS = "none,bf16,fp16,int8-block64,dynamic8-block64,auto"


@dataclass
class Row:
    """One codec on one link."""

    link_mbit: float  # every link's cap (0: unlimited)
    codec: str  # what the client asked for
    chosen: list[str] = field(default_factory=list)  # the codec of each hop
    measured_mbit: list[float | None] = field(default_factory=list)  # auto: each hop's probe figure
    lossless_share: list[float] = field(default_factory=list)  # auto: fp32 transfer / hop step
    tokens_per_s: float = 0.0
    agree_local: int = 0  # greedy tokens equal to --local (same weights) before the first miss
    new_tokens: int = 0


def agreement(got: list[int], want: list[int]) -> int:
    return next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), len(want))


def run_local(source, quant: str, prompt: list[int], new: int) -> tuple[float, list[int]]:
    """Decode tokens/s of generate_local (the --local path) and its greedy tokens."""
    from swarm.generation import generate_local
    from swarm.model.loading import load_model

    model = load_model(source, quant=quant, progress=False)
    times: list[float] = []
    tokens = generate_local(
        model, None, prompt, new, stop_on_eos=False, on_token=lambda _t: times.append(time.time())
    )
    del model
    return (len(times) - 1) / max(1e-9, times[-1] - times[0]), tokens


def run_codec(args, boot, prompt, want, codec: str, mbit: float) -> Row:
    from petals_like.model import DistributedModelForCausalLM

    with DistributedModelForCausalLM.from_pretrained(
        args.model, boot, compression=codec, link_bandwidth=mbit
    ) as model:
        best = 0.0
        for _ in range(max(1, args.repeats)):
            out = model.generate(prompt, max_new_tokens=args.new_tokens, stop_on_eos=False)
            best = max(best, model.last_stats.decode_tokens_per_s)
        st, router = model.last_stats, model.router
        chosen = [router.codec_for(h.peer_id) for h in st.route]
        links = [router.codec_choices.get(h.peer_id) for h in st.route]
    # An unmeasurably fast link (inf) is None in the JSON.
    measured = [
        None if math.isinf(c.link.mbit_per_s) else round(c.link.mbit_per_s, 1)
        for c in links
        if c is not None and c.link is not None
    ]
    shares = [round(c.lossless_share, 4) for c in links if c is not None and c.link is not None]
    got = out[0, len(prompt) :].tolist()
    return Row(mbit, codec, chosen, measured, shares, best, agreement(got, want), len(want))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m simulations.bench_codec",
        description=__doc__.split("\n\n")[0],
        epilog="Progress goes to stderr at least every 10 s.",
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument("--model", default="smollm2-135m", help="model name or path")
    p.add_argument(
        "--prompt", default="The three primary colors are red, yellow and", help="greedy prompt"
    )
    p.add_argument("--new-tokens", type=int, default=48, help="greedy tokens per run")
    p.add_argument("--quant", default="int8", help="the peers' (and --local's) block weights")
    p.add_argument("--peers", type=int, default=2, help="peers, each an equal share of blocks")
    p.add_argument("--codecs", default=DEFAULT_CODECS, help="comma-separated codecs to compare")
    p.add_argument(
        "--links",
        default="0,10",
        help="comma-separated link caps in Mbit/s, a swarm each (0: none)",
    )
    p.add_argument("--repeats", type=int, default=2, help="runs per row (the best tok/s is kept)")
    p.add_argument("--json", action="store_true", help="also print one JSON object")
    args = p.parse_args(argv)
    with Progress("bench_codec") as progress:
        try:
            bench(args, progress)
        except KeyboardInterrupt:
            print("bench_codec: interrupted; peers stopped", file=sys.stderr)
            sys.exit(130)


def bench(args: argparse.Namespace, progress: Progress) -> None:
    """Every measurement, then the table (and JSON with --json) on stdout."""
    log = progress.update
    from swarm.model.loading import load_config, load_tokenizer, resolve_model

    torch.manual_seed(0)
    source = resolve_model(args.model)
    n = load_config(source).num_layers
    k = max(1, args.peers)
    spans = [f"{i * n // k}:{(i + 1) * n // k}" for i in range(k)]
    prompt = load_tokenizer(source).encode(args.prompt)
    codecs = [c.strip() for c in args.codecs.split(",") if c.strip()]
    local_tps, want = run_local(source, args.quant, prompt, args.new_tokens)
    log(f"local {args.quant}: {local_tps:.1f} tok/s; {n} blocks on peers {spans}")
    rows: list[Row] = []
    for mbit in [float(x) for x in args.links.split(",") if x.strip()]:
        log(f"starting {k} {args.quant} peers, links {mbit or 'unlimited'} Mbit/s")
        flags = ("--quant", args.quant, "--link-bandwidth", str(mbit))
        swarm, boot = start_local_swarm(args.model, spans, n, source.name, *flags)
        try:
            for codec in codecs:
                row = run_codec(args, boot, prompt, want, codec, mbit)
                rows.append(row)
                log(f"{mbit or 'unlimited'} Mbit/s {codec}: {row.tokens_per_s:.1f} tok/s")
        finally:
            swarm.close()
    print(f"local {args.quant}: {local_tps:.2f} tok/s, {len(want)} greedy tokens")
    print(
        f"{'link':>9} {'codec':<17} {'chosen':<30} {'tok/s':>7} {'=local':>7}  "
        "auto: measured Mbit/s (round trip), fp32 share of the step"
    )
    for r in rows:
        link = f"{r.link_mbit:g} Mb" if r.link_mbit else "unlim"
        print(
            f"{link:>9} {r.codec:<17} {','.join(r.chosen):<30} {r.tokens_per_s:>7.2f} "
            f"{f'{r.agree_local}/{r.new_tokens}':>7}  {r.measured_mbit or '-'} "
            f"{r.lossless_share or ''}"
        )
    if args.json:
        out = {
            "model": args.model,
            "quant": args.quant,
            "local_tokens_per_s": local_tps,
            "rows": [asdict(r) for r in rows],
            "cpus": os.cpu_count(),
        }
        print(json.dumps(out))


if __name__ == "__main__":
    main()
