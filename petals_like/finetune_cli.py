"""`swarm-finetune`: train LoRA adapters or soft prompts of a model served by a frozen swarm.

Prints one line per step (`step N loss X samples/s Y retries R`) and a summary with `lost=N`.
"""

from __future__ import annotations

import argparse
import logging
import sys

import swarm.cli  # noqa: F401 - first: bounds OpenMP spin before torch is imported

# isort: split
import torch

from petals_like.finetune import (
    FinetuneConfig,
    StepStats,
    TokenWindows,
    finetune,
    tokenize_files,
)
from petals_like.tuning import TuningConfig
from swarm.cli.console import run_main, setup_logging
from swarm.cli.options import add_config_options, config_from_args
from swarm.procs import reap_children_on_exit

MADDR_PREFIXES = ("/ip4/", "/ip6/", "/dns", "/p2p/")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swarm-finetune", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    parser.add_argument("files", nargs="*", metavar="FILE", help="more text files (as --data)")
    add_config_options(parser, FinetuneConfig)
    add_config_options(parser, TuningConfig)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags; --initial-peers and --data take several values each, so each is checked here."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.initial_peers:
        parser.error("--initial-peers needs a multiaddr")
    # Files swallowed by --initial-peers (`--initial-peers MADDR file.txt`): give them back.
    stray = [a for a in args.initial_peers if not a.startswith(MADDR_PREFIXES)]
    args.initial_peers = [a for a in args.initial_peers if a.startswith(MADDR_PREFIXES)]
    args.data = [*args.data, *stray, *args.files]
    if not args.initial_peers:
        parser.error("--initial-peers needs a multiaddr (/ip4/..., /ip6/..., /dns/...)")
    if not args.data:
        parser.error("--data needs at least one text file")
    if args.steps <= 0 or args.batch_size <= 0 or args.seq_len <= 1:
        parser.error("--steps, --batch-size must be positive and --seq-len above 1")
    return args


def run(args: argparse.Namespace) -> int:
    from petals_like.model import DistributedModelForCausalLM

    config = config_from_args(FinetuneConfig, args)
    tuning = config_from_args(TuningConfig, args)
    reap_children_on_exit()  # the DHT's process and p2pd go when we go, even on SIGKILL
    torch.manual_seed(config.seed)
    model = DistributedModelForCausalLM.from_pretrained(
        config.model, config.initial_peers, compression=config.compression, tuning=tuning
    )
    try:
        ids = tokenize_files(config.data, model.tokenizer, model.config.vocab_size)
        windows = TokenWindows(ids, config.seq_len, config.heldout, config.seed)

        def on_step(s: StepStats) -> None:
            print(
                f"step {s.step} loss {s.loss:.4f} samples/s {s.samples_per_s:.2f} "
                f"retries {s.retries}",
                flush=True,
            )

        result = finetune(model, config, windows, on_step)
        if config.save:
            model.save_adapter(config.save)
    finally:
        model.close()
    h = result.history
    first = h[0].loss if h else float("nan")
    last = h[-1].loss if h else float("nan")
    wire = sum(s.wire_bytes for s in h) / max(len(h), 1)
    print(
        f"done method={tuning.method} steps={len(h)} samples={result.samples} "
        f"first_loss={first:.4f} last_loss={last:.4f} heldout_before={result.heldout_before:.4f} "
        f"heldout_after={result.heldout_after:.4f} retries={result.retries} "
        f"wire_bytes_per_step={wire:.0f} seconds={result.seconds:.1f} lost={result.lost}"
        + (f" saved={config.save}" if config.save else ""),
        flush=True,
    )
    return 0 if result.lost == 0 else 1


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging(args.verbose, logging.WARNING)
    sys.exit(run_main("swarm-finetune", lambda: run(args)))


if __name__ == "__main__":
    main()
