"""Idle benchmark: how much slower a span's decode step runs after the process sat idle, as a peer
of a chain does between its steps (about 2/3 of the time on loopback, 95% over a 50 ms WAN).

Steps of one span (blocks 0:N, batch 1, one token) run back to back, and after each gap, with
the thread asleep or spinning through it; rounds alternate the gaps, so drifting load hits all.
A slowdown that stays when the thread spins is not the thread's sleep: the cores' caches and
clocks went cold (on this sandbox's VM, the host's). It is what a chain pays per hop beyond the
figures of bench_peer's interleaved local steps, and more the longer the link's delay.

Run: python -m simulations.bench_idle [--quant int8] [--gaps 0,0.02,0.1,0.25] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import swarm.cli  # noqa: F401  (first: the OpenMP wait policy peers run with, set before torch)
from simulations.cli_help import DefaultsHelpFormatter


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def measure(model_name: str, quant: str, blocks: int, gaps: list[float], rounds: int) -> dict:
    """Median step ms per (gap, asleep|spinning), and each one's ratio to back to back."""
    import torch

    from simulations.bench_peer import _local_span
    from swarm.model.loading import load_model

    model = load_model(model_name, quant=quant, progress=False)
    hidden = model.config.hidden_size
    step = _local_span(model, 0, blocks, rounds * (2 * len(gaps) + 1) + 8)
    waits = {"0": lambda: None}
    for g in gaps:
        if g > 0:
            waits[f"sleep_{g:g}"] = lambda g=g: time.sleep(g)
            waits[f"spin_{g:g}"] = lambda g=g: _spin(g)
    times: dict[str, list[float]] = {k: [] for k in waits}
    pos = 0
    step(torch.randn(1, 1, hidden), pos)  # warm-up
    for r in range(rounds):
        for name in list(waits) if r % 2 == 0 else list(waits)[::-1]:
            waits[name]()
            x = torch.randn(1, 1, hidden)
            t0 = time.perf_counter()
            step(x, pos + 1)
            times[name].append(time.perf_counter() - t0)
            pos += 1
    base = statistics.median(times["0"])
    return {
        "model": model_name,
        "quant": quant,
        "blocks": blocks,
        "rounds": rounds,
        "step_ms": {k: round(statistics.median(v) * 1e3, 2) for k, v in times.items()},
        "vs_back_to_back": {k: round(statistics.median(v) / base, 2) for k, v in times.items()},
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m simulations.bench_idle",
        description=__doc__.split("\n\n")[0],
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument("--model", default="smollm2-135m", help="model name or path")
    p.add_argument("--quant", default="int8", help="block weights (none, int8, nf4, ...)")
    p.add_argument("--blocks", type=int, default=10, help="blocks in the span (a peer's share)")
    p.add_argument("--gaps", default="0.02,0.1,0.25", help="idle gaps, seconds, comma-separated")
    p.add_argument("--rounds", type=int, default=15, help="steps per gap")
    p.add_argument("--json", action="store_true", help="print one JSON object instead")
    args = p.parse_args(argv)
    gaps = [float(g) for g in args.gaps.split(",") if g.strip()]
    out = measure(args.model, args.quant, args.blocks, gaps, args.rounds)
    if args.json:
        print(json.dumps(out))
        return
    print(f"{args.model} blocks 0:{args.blocks} ({args.quant}), batch 1, one token per step")
    print(f"{'before the step':<16} {'step ms':>8} {'x back to back':>15}")
    for k, ms in out["step_ms"].items():
        label = "nothing" if k == "0" else k.replace("_", " ") + " s"
        print(f"{label:<16} {ms:>8.2f} {out['vs_back_to_back'][k]:>15.2f}")


if __name__ == "__main__":
    main()
