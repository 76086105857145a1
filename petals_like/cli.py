"""The `swarm-generate` command: stream a model's continuation of a prompt to stdout.

Used by users and tests; `--local` runs the whole model here, `--initial-peers` uses the mesh.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import swarm.cli  # noqa: F401, I001 - first: bounds OpenMP spin before torch is imported
from petals_like.console import PrefillProgress, cut_notice
from petals_like.distributed_cli import add_distributed_arguments, run_distributed
from petals_like.verify import DEFAULT_FRACTION
from swarm.cli.console import run_main, setup_logging
from swarm.cli.options import add_config_options, config_from_args
from swarm.errors import SwarmError
from swarm.generation import SamplingConfig, generate_local
from swarm.model.loading import DEFAULT_MODEL, load_model, load_tokenizer, resolve_model
from swarm.model.tokenizer import StreamDecoder
from swarm.procs import reap_children_on_exit
from swarm.quant import QUANT_MODES
from swarm.speculative import SpeculativeStats

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="swarm-generate", description="Generate text with a Llama-family model."
    )
    # "?" so that a prompt after --initial-peers (which takes several values) is still found.
    p.add_argument("prompt", nargs="?", help="the text to continue")
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="HF folder, .gguf file or alias (default: %(default)s)",
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument("--local", action="store_true", help="run the whole model in this process")
    where.add_argument(
        "--initial-peers", nargs="+", metavar="MADDR", help="join the swarm at these multiaddrs"
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=32,
        help="most new tokens; fewer at an end of text or of the context (default: %(default)s)",
    )
    add_config_options(p, SamplingConfig)
    p.add_argument(
        "--quant",
        choices=QUANT_MODES,
        default="none",
        help="block weights with --local: none, int8, or 4-bit nf4/fp4/int4 (default: %(default)s)",
    )
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument(
        "--speculative",
        metavar="ngram|MODEL",
        default=None,
        help="draft tokens and verify several per step (per chain round trip on the swarm): "
        "'ngram' looks them up in the text so far, or a small local model with the same "
        "tokenizer drafts them; greedy text is unchanged (batch 1)",
    )
    p.add_argument(
        "--verify",
        type=_fraction,
        default=DEFAULT_FRACTION,
        metavar="F",
        help="with --initial-peers: share of steps re-run on another replica of each span and "
        "compared; a peer caught lying is banned and its tokens generated again, and text is "
        "shown once checked (0: off, 1: every step; default: %(default)s)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    add_distributed_arguments(p)
    return p


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1], got {text}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags, with the prompt taken back from the end of --initial-peers if it landed there."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # Multiaddrs start with "/": a last value that does not is the prompt (the documented order
    # `--initial-peers MADDR "prompt"`).
    if args.prompt is None and args.initial_peers and not args.initial_peers[-1].startswith("/"):
        args.prompt = args.initial_peers.pop()
    if args.prompt is None:
        parser.error("the following arguments are required: prompt")
    if not args.local and args.initial_peers == []:
        parser.error("--initial-peers needs a multiaddr")
    return args


def run_local(args: argparse.Namespace) -> None:
    """Load the whole model here, stream the continuation to stdout and a summary to stderr."""
    sampling = config_from_args(SamplingConfig, args)
    t0 = time.perf_counter()
    source = resolve_model(args.model)
    tokenizer = load_tokenizer(source)
    model = load_model(source, quant=args.quant)
    load_s = time.perf_counter() - t0
    prompt = args.prompt
    if args.chat:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    prompt_ids = tokenizer.encode(prompt)
    stream = StreamDecoder(tokenizer)
    first: list[float] = []

    def on_token(token: int) -> None:
        if not first:
            first.append(time.perf_counter())
        sys.stdout.write(stream.push(token))
        sys.stdout.flush()

    spec = SpeculativeStats() if args.speculative else None
    t1 = time.perf_counter()
    new_ids = generate_local(
        model,
        tokenizer,
        prompt_ids,
        args.max_new_tokens,
        sampling,
        on_token=on_token,
        on_prefill=PrefillProgress(),
        speculative=args.speculative,
        stats=spec,
    )
    gen_s = time.perf_counter() - t1
    sys.stdout.write(stream.flush() + "\n")
    sys.stdout.flush()
    context = model.config.max_position_embeddings
    notice = cut_notice(args.max_new_tokens, len(new_ids), len(prompt_ids), context)
    if notice:
        print(notice, file=sys.stderr)
    first_ms = (first[0] - t1) * 1000 if first else 0.0
    # Decode speed excludes the prefill step, which the first-token time reports.
    decode_s = gen_s - first_ms / 1000
    tps = (len(new_ids) - 1) / decode_s if len(new_ids) > 1 and decode_s > 0 else 0.0
    print(
        f"model {source.name} quant {args.quant}: load {load_s:.2f}s, prompt {len(prompt_ids)} "
        f"tokens, generated {len(new_ids)} tokens in {gen_s:.2f}s, first token {first_ms:.0f} ms, "
        f"{tps:.1f} tokens/s",
        file=sys.stderr,
    )
    if spec is not None:
        print(spec.summary(args.speculative), file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 0:
        raise SwarmError("--max-new-tokens must be >= 0")
    if args.local:
        if getattr(args, "adapter", None):
            raise SwarmError("--adapter works through the swarm: give --initial-peers")
        run_local(args)
        return 0
    if args.initial_peers:
        reap_children_on_exit()  # the DHT's process and p2pd go when we go, even on SIGKILL
        return run_distributed(args)
    raise SwarmError("give --local to run here, or --initial-peers MADDR to use a swarm")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging(args.verbose, logging.WARNING)
    sys.exit(run_main("swarm-generate", lambda: run(args)))


if __name__ == "__main__":
    main()
