"""`swarm-train`: SWARM training of a model over the mesh's training peers.

Prints one line per step (`step N loss X samples/s Y retries R`) and a summary with `lost=N`.
SIGINT (Ctrl-C) or SIGTERM ends the run cleanly: the steps begun finish, --save still saves and
the summary is printed; a second signal aborts.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from swarm import loops
from swarm.cli.console import run_main, setup_logging
from swarm.cli.options import add_config_options, config_from_args
from swarm.procs import reap_children_on_exit
from swarm.training.trainer import StepStats, Trainer, TrainerConfig


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swarm-train", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    add_config_options(parser, TrainerConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose, logging.WARNING)
    return run_main("swarm-train", lambda: train(config_from_args(TrainerConfig, args)))


def train(config: TrainerConfig) -> int:
    reap_children_on_exit()
    trainer = Trainer(config)
    # Stages started with --run-trainers take settings only from the ids listed there.
    print(f"trainer peer id {trainer.trainer_id}", file=sys.stderr, flush=True)

    def on_step(s: StepStats) -> None:
        print(
            f"step {s.step} loss {s.loss:.4f} samples/s {s.samples_per_s:.2f} retries {s.retries}",
            flush=True,
        )

    try:
        history = loops.run(_run_until_signalled(trainer, on_step))
        if config.save:
            from swarm.training.checkpoint import save_checkpoint

            save_checkpoint(trainer, config.save)
    finally:
        trainer.shutdown()
    first = history[0].loss if history else float("nan")
    last = history[-1].loss if history else float("nan")
    print(
        f"done steps={len(history)} samples={trainer.samples_done} first_loss={first:.4f} "
        f"last_loss={last:.4f} retries={trainer.retries} resent={trainer.resent} "
        f"wire_bytes_per_sample={trainer.wire_bytes / max(trainer.samples_done, 1):.0f} "
        f"max_staleness={trainer.max_staleness} lost={trainer.lost}",
        flush=True,
    )
    return 0 if trainer.lost == 0 else 1


async def _run_until_signalled(trainer: Trainer, on_step) -> list[StepStats]:
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)

    def stop(sig: signal.Signals) -> None:
        print(f"swarm-train: {sig.name}: stopping after the steps begun", file=sys.stderr)
        trainer.stop()
        for s in signals:  # the next one aborts (SIGINT: KeyboardInterrupt, SIGTERM: exit)
            loop.remove_signal_handler(s)

    for sig in signals:
        loop.add_signal_handler(sig, stop, sig)
    try:
        return await trainer.run(on_step)
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


if __name__ == "__main__":
    sys.exit(main())
