"""`swarm-train`: SWARM training of a model over the mesh's training peers.

Prints one line per step (`step N loss X samples/s Y retries R`) and a summary with `lost=N`.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import sys

from swarm.errors import SwarmError
from swarm.training.trainer import StepStats, Trainer, TrainerConfig

HELP = {
    "model": "model name (e.g. smollm2-135m) or checkpoint folder / GGUF file, as the peers'",
    "initial_peers": "multiaddrs of peers of the swarm",
    "data": "text files to train on",
    "steps": "optimizer steps to run",
    "batch_size": "sequences per step (the target batch of every stage)",
    "seq_len": "tokens per sequence",
    "microbatches": "microbatches per step, pipelined through the stages",
    "run_id": "name of the training run (the peers' --run-id)",
    "lr": "AdamW learning rate (used by every stage)",
    "weight_decay": "AdamW weight decay",
    "optim_8bit": "keep the trainer's AdamW moments in 8 bits",
    "compression": "codec of activations and gradients in all four directions "
    "(none, int8-block64, ...)",
    "seed": "seed of data order and replica choice",
    "forward_timeout": "seconds before a forward call is retried elsewhere",
    "backward_timeout": "seconds before a backward call is retried elsewhere",
    "max_attempts": "replicas tried per stage call before a microbatch is counted lost",
    "ban_s": "seconds a failed replica is skipped",
    "step_timeout": "most seconds to wait for the stages to step together",
    "stall_timeout": "most seconds a stage may have no replica to call before work is lost",
    "dht_timeout": "bound on each DHT read or write",
    "save": "write a Hugging Face-style checkpoint folder here at the end",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swarm-train", description=__doc__.splitlines()[0])
    defaults = TrainerConfig()
    for f in dataclasses.fields(TrainerConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if isinstance(default, bool):
            parser.add_argument(flag, action="store_true", help=HELP[f.name])
        elif isinstance(default, list):
            parser.add_argument(flag, nargs="+", default=[], help=HELP[f.name])
        else:
            kind = type(default) if default is not None else str
            parser.add_argument(flag, type=kind, default=default, help=HELP[f.name])
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config = TrainerConfig(**vars(args))
    try:
        trainer = Trainer(config)
    except (SwarmError, ValueError) as e:
        print(f"swarm-train: {e}", file=sys.stderr)
        return 2

    def on_step(s: StepStats) -> None:
        print(
            f"step {s.step} loss {s.loss:.4f} samples/s {s.samples_per_s:.2f} retries {s.retries}",
            flush=True,
        )

    try:
        history = asyncio.run(trainer.run(on_step))
        if config.save:
            from swarm.training.checkpoint import save_checkpoint

            save_checkpoint(trainer, config.save)
    except SwarmError as e:
        print(f"swarm-train: {e}", file=sys.stderr)
        return 1
    finally:
        trainer.shutdown()
    first = history[0].loss if history else float("nan")
    last = history[-1].loss if history else float("nan")
    print(
        f"done steps={len(history)} samples={trainer.samples_done} first_loss={first:.4f} "
        f"last_loss={last:.4f} retries={trainer.retries} resent={trainer.resent} "
        f"wire_bytes_per_sample={trainer.wire_bytes / max(trainer.samples_done, 1):.0f} "
        f"lost={trainer.lost}",
        flush=True,
    )
    return 0 if trainer.lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
