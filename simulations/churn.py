"""CLI of the discrete-event churn simulator: SWARM vs fixed pipelines under preemptions.

Run as `python -m simulations.churn`; prints a table (or JSON lines) and can draw PNG plots.

Examples:
  python -m simulations.churn --peers 400 --preempt-per-hour 20 --plot /tmp/churn.png
  python -m simulations.churn --peers 400 --sweep preempt-per-hour=0,5,10,20,40 --json
  python -m simulations.churn --calibration measured.json --strategy swarm --json

Output: a table with one row per (swept value, strategy). With --json, one JSON object per run,
one per line (JSON lines); a single run (one --strategy, no --sweep) prints exactly one object.
Each object has at least throughput (samples per virtual second), utilisation and lost_samples,
and the step figures: step_batch, steps, mean_round_s, held_fraction (microbatch slots held back
by the staleness bound or the barrier) and max_staleness. Stages step at --target-batch; SWARM
averages in the background (--background-averaging 0: lock-step), the pipelines with a barrier.
Without --strategy all three strategies run. A calibration JSON sets any SimConfig field by name
(e.g. {"compute_per_sample_s": 0.4, "bandwidth_mbps": 90, "latency_ms": 3}); flags given on the
command line win over it.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time

from simulations.progress import Progress
from simulations.sim.model import STRATEGIES, SimConfig, load_calibration
from simulations.sim.strategies import SimResult, simulate

# Flags the CLI does not generate from SimConfig fields.
_NOT_FLAGS = {"strategy"}


def _parse_value(field: dataclasses.Field, text: str) -> object:
    default = field.default
    if isinstance(default, bool):
        return text.lower() in ("1", "true", "yes")
    if isinstance(default, int):
        return int(text)
    return float(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.churn",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for field in dataclasses.fields(SimConfig):
        if field.name in _NOT_FLAGS:
            continue
        flag = "--" + field.name.replace("_", "-")
        # Every flag parses like a sweep value, so `--periodic-churn 0` means False.
        parser.add_argument(
            flag,
            type=functools.partial(_parse_value, field),
            default=None,
            help=f"default {field.default}",
        )
    parser.add_argument("--strategy", choices=STRATEGIES, action="append", default=None)
    parser.add_argument("--sweep", default=None, help="FIELD=V1,V2,... e.g. preempt-per-hour=0,5")
    parser.add_argument("--calibration", default=None, help="JSON object of SimConfig fields")
    parser.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    parser.add_argument("--timeline", action="store_true", help="include timelines in --json")
    parser.add_argument("--plot", default=None, help="write a PNG here")
    return parser


def config_from_args(args: argparse.Namespace) -> dict:
    values: dict = {}
    if args.calibration:
        values.update(load_calibration(args.calibration))
    for field in dataclasses.fields(SimConfig):
        given = getattr(args, field.name, None)
        if field.name not in _NOT_FLAGS and given is not None:
            values[field.name] = given
    return values


def parse_sweep(text: str) -> tuple[str, list]:
    name, _, raw = text.partition("=")
    name = name.strip().replace("-", "_")
    fields = {f.name: f for f in dataclasses.fields(SimConfig)}
    if name not in fields or not raw:
        raise ValueError(f"--sweep wants FIELD=V1,V2,... with a SimConfig field, got {text!r}")
    return name, [_parse_value(fields[name], v) for v in raw.split(",") if v.strip()]


def run_all(
    base: dict,
    strategies: list[str],
    sweep: tuple[str, list] | None,
    progress: Progress | None = None,
) -> list[tuple]:
    """(swept value or None, SimResult) for every combination, in a fixed order.

    progress: told which run is simulating (repeated on stderr while it runs); None: silent.
    """
    values = sweep[1] if sweep else [None]
    total = len(values) * len(strategies)
    current = [""]
    if progress is not None:
        progress.update(lambda: current[0])
    rows = []
    for value in values:
        changes = {sweep[0]: value} if sweep else {}
        for strategy in strategies:
            point = f", {sweep[0]}={value}" if sweep else ""
            current[0] = f"run {len(rows) + 1} of {total}: {strategy}{point}"
            cfg = SimConfig(**{**base, **changes, "strategy": strategy})
            rows.append((value, simulate(cfg)))
    return rows


def format_table(rows: list[tuple], sweep_name: str | None) -> str:
    head = f"{sweep_name or '':>16} {'strategy':<18} {'samples/s':>10} {'util':>6} "
    head += f"{'lost':>6} {'wasted':>7} {'retries':>8} {'preempt':>8} {'moves':>6} "
    head += f"{'steps':>6} {'round_s':>7} {'held':>5} {'stale':>5} {'wall_s':>7}"
    lines = [head.rstrip() if not sweep_name else head, "-" * len(head)]
    for value, r in rows:
        lines.append(
            f"{'' if value is None else value:>16} {r.strategy:<18} {r.throughput:>10.1f} "
            f"{r.utilisation:>6.3f} {r.lost_samples:>6} {r.wasted_fraction:>7.4f} "
            f"{r.retries:>8} {r.preemptions:>8} {r.moves:>6} {r.steps:>6} "
            f"{r.mean_round_s:>7.1f} {r.held_fraction:>5.2f} {r.max_staleness:>5} {r.wall_s:>7.1f}"
        )
    first = rows[0][1]
    lines.append(
        f"(microbatch {first.microbatch} samples per simulated task; step {first.step_batch} "
        f"samples; compute bound {first.compute_bound:.0f} samples/s; network bound "
        f"{first.network_bound:.0f} for {first.strategy})"
    )
    return "\n".join(lines)


def plot(rows: list[tuple], sweep_name: str | None, path: str) -> None:
    """Throughput over time (the last swept value) and, for a sweep, against the swept value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = 2 if sweep_name else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 4), squeeze=False)
    last = rows[-1][0]
    ax = axes[0][0]
    for value, r in rows:
        if value == last:
            hours, rates = zip(*r.timeline, strict=True) if r.timeline else ((), ())
            ax.plot(hours, rates, label=r.strategy)
    title = "throughput over time" + (f" ({sweep_name}={last})" if sweep_name else "")
    ax.set(xlabel="virtual hours", ylabel="samples/s", title=title)
    ax.legend()
    if sweep_name:
        ax = axes[0][1]
        for strategy in dict.fromkeys(r.strategy for _, r in rows):
            points = [(v, r.throughput) for v, r in rows if r.strategy == strategy]
            ax.plot(*zip(*points, strict=True), marker="o", label=strategy)
        ax.set(xlabel=sweep_name, ylabel="samples/s", title=f"throughput vs {sweep_name}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        base = config_from_args(args)
        sweep = parse_sweep(args.sweep) if args.sweep else None
        strategies = args.strategy or list(STRATEGIES)
        SimConfig(**{**base, "strategy": strategies[0]})  # fail on bad values before running
    except (ValueError, TypeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    with Progress("churn") as progress:
        rows = run_all(base, strategies, sweep, progress)
    if args.json:
        for value, r in rows:
            data = r.to_dict(timeline=args.timeline)
            if sweep:
                data[sweep[0]] = value
            print(json.dumps(data), flush=True)
    else:
        print(format_table(rows, sweep[0] if sweep else None))
        print(f"simulated in {time.perf_counter() - started:.1f} s wall", file=sys.stderr)
    if args.plot:
        plot(rows, sweep[0] if sweep else None, args.plot)
        print(f"plot written to {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["SimResult", "main", "run_all"]
