"""A compute-free stand-in for a model: its tokenizer and its number of blocks, each block at
hidden size 64 (random weights), so that the benchmarks show what transport and software cost
with next to no compute (they take a folder for --model):

    python -m simulations.skeleton /tmp/skel          # SmolLM2-135M's tokenizer, 30 blocks
    python -m simulations.bench_peer --model /tmp/skel
    python -m simulations.bench_inference --model /tmp/skel --wan-only --failover-trials 0
    python -m simulations.bench_idle --model /tmp/skel

The text it generates means nothing; the rows' token rates and per-hop costs do.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from simulations.cli_help import DefaultsHelpFormatter
from swarm.model.loading import load_config, load_tokenizer
from swarm.tiny_checkpoint import TINY_CONFIG, write_tiny_checkpoint


def write_skeleton(out: Path, model: str = "smollm2-135m") -> Path:
    """Write to `out` a Hugging Face folder with `model`'s tokenizer and block count at the
    tiny model's widths; returns `out`."""
    source = load_config(model)
    config = dict(
        TINY_CONFIG,
        vocab_size=source.vocab_size,
        num_hidden_layers=source.num_layers,
        max_position_embeddings=source.max_position_embeddings,
        bos_token_id=source.bos_token_id,
        eos_token_id=source.eos_token_id,
    )
    write_tiny_checkpoint(out, config, std=0.02)
    load_tokenizer(model).save(out)
    return Path(out)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.skeleton",
        description=__doc__.split("\n\n")[0],
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("out", type=Path, help="folder to write (created if missing)")
    parser.add_argument("--model", default="smollm2-135m", help="model name or path to mimic")
    args = parser.parse_args()
    print(write_skeleton(args.out, args.model))


if __name__ == "__main__":
    main()
