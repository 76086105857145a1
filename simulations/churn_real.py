"""Real-process churn harness: a bootstrap and N peers on 127.0.0.1, killed and restarted on a
schedule while `swarm-train` trains; reports throughput, retries and lost microbatches.

Run as `python -m simulations.churn_real` (the harness itself is simulations/churn_harness.py);
`--calibrate` also fits and checks the churn simulator (simulations/calibrate.py).

Examples:
  python -m simulations.churn_real --peers 4 --stages 2 --steps 12 --kill-every 15
  python -m simulations.churn_real --peers 4 --stages 2 --steps 16 --kill-every 12 --calibrate
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from dataclasses import asdict

from simulations.calibrate import calibrate, format_report
from simulations.churn_harness import HarnessConfig, HarnessResult, run_harness
from simulations.cli_help import DefaultsHelpFormatter
from simulations.progress import Progress
from simulations.scratch import scratch_dir


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.churn_real",
        description=__doc__.split("\n\n")[0],
        epilog="Progress (step, kills, restarts) goes to stderr at least every 10 s. Without "
        "--workdir the logs live in a temp dir that is removed at exit.",
        formatter_class=DefaultsHelpFormatter,
    )
    d = HarnessConfig()
    parser.add_argument("--mode", choices=("train", "generate"), default=d.mode)
    parser.add_argument("--peers", type=int, default=d.peers, help="peers (stage replicas)")
    parser.add_argument("--stages", type=int, default=d.stages, help="pipeline stages")
    parser.add_argument("--kill-every", type=float, default=d.kill_every, help="s; 0: no churn")
    parser.add_argument("--kill-signal", choices=("KILL", "TERM", "mixed"), default=d.kill_signal)
    parser.add_argument("--restart-after", type=float, default=d.restart_after, help="s")
    parser.add_argument("--max-kills", type=int, default=d.max_kills, help="0: no limit")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=d.steps, help="trainer steps")
    length.add_argument(
        "--duration", type=float, default=None, help="s of training instead of --steps"
    )
    parser.add_argument("--model", default=d.model, help="'tiny' (written to a temp dir) or path")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--seq-len", type=int, default=d.seq_len)
    parser.add_argument("--microbatches", type=int, default=d.microbatches)
    parser.add_argument("--announce-period", type=float, default=d.announce_period)
    parser.add_argument("--max-wall", type=float, default=d.max_wall, help="s bound per run")
    parser.add_argument(
        "--workdir",
        default=None,
        help="keep logs and model here (default: a temp dir, removed at exit)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--calibrate",
        action="store_true",
        help="also run without churn, fit the simulator to it and compare predicted vs measured",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log the kill schedule")
    return parser


def format_result(r: HarnessResult) -> str:
    return (
        f"samples/s {r.throughput:.3f} (wall {r.throughput_wall:.3f})  steps {r.steps}  "
        f"samples {r.samples}  kills {r.kills}  restarts {r.restarts}  retries {r.retries}  "
        f"resent {r.resent}  lost {r.lost}  finished {r.finished}  "
        f"step split {r.compute_s:.2f}s + {r.wait_s:.2f}s  startup {r.startup_s:.1f}s  "
        f"left running {len(r.left_running)}  "
        + (f"logs {r.workdir}" if r.workdir else "logs removed (pass --workdir DIR to keep them)")
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    values = {k: v for k, v in vars(args).items() if k in HarnessConfig.__dataclass_fields__}
    cfg = HarnessConfig(**values)
    try:
        cfg.validate()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        with Progress("churn_real") as progress, scratch_dir("churn_real_", cfg.workdir) as wd:
            run_cfg = dataclasses.replace(cfg, workdir=str(wd))
            if args.calibrate:
                report = calibrate(run_cfg, progress)
            else:
                result = run_harness(run_cfg, progress)
    except (RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("churn_real: interrupted; every process stopped", file=sys.stderr)
        return 130
    if cfg.workdir is None:  # the temp dir went with the block: name nothing in it
        if args.calibrate:
            report["calibration_file"], report["workdirs"] = "", []
        else:
            result.workdir = ""
    if args.calibrate:
        print(json.dumps(report) if args.json else format_report(report), flush=True)
        churn = report["churn"]
        return 0 if churn["valid"] and churn["measured"]["lost"] == 0 else 1
    print(json.dumps(asdict(result)) if args.json else format_result(result), flush=True)
    if result.error:
        print(f"trainer failed: {result.error}", file=sys.stderr)
    return 0 if result.finished and result.lost == 0 and result.throughput > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
