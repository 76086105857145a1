"""The `swarm-generate` command: stream a model's continuation of a prompt to stdout.

Used by users and tests; `--local` runs the whole model here, `--initial-peers` uses the mesh.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from petals_like.distributed_cli import add_distributed_arguments, run_distributed
from swarm.errors import SwarmError
from swarm.generation import SamplingConfig, generate_local
from swarm.model.loading import DEFAULT_MODEL, load_model, load_tokenizer, resolve_model
from swarm.model.tokenizer import StreamDecoder

logger = logging.getLogger(__name__)

_SAMPLING_DEFAULTS = SamplingConfig()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="swarm-generate", description="Generate text with a Llama-family model."
    )
    p.add_argument("prompt", help="the text to continue")
    p.add_argument(
        "--model", default=DEFAULT_MODEL, help="HF folder, .gguf file or alias (%(default)s)"
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument("--local", action="store_true", help="run the whole model in this process")
    where.add_argument("--initial-peers", nargs="+", metavar="MADDR", help="join the swarm here")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=_SAMPLING_DEFAULTS.temperature)
    p.add_argument("--top-k", type=int, default=_SAMPLING_DEFAULTS.top_k)
    p.add_argument("--top-p", type=float, default=_SAMPLING_DEFAULTS.top_p)
    p.add_argument(
        "--repetition-penalty", type=float, default=_SAMPLING_DEFAULTS.repetition_penalty
    )
    p.add_argument("--seed", type=int, default=_SAMPLING_DEFAULTS.seed)
    p.add_argument("--quant", choices=("none", "int8"), default="none", help="block weights")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    add_distributed_arguments(p)
    return p


def sampling_from_args(args: argparse.Namespace) -> SamplingConfig:
    return SamplingConfig(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )


def run_local(args: argparse.Namespace) -> None:
    """Load the whole model here, stream the continuation to stdout and a summary to stderr."""
    sampling = sampling_from_args(args)
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

    t1 = time.perf_counter()
    new_ids = generate_local(
        model, tokenizer, prompt_ids, args.max_new_tokens, sampling, on_token=on_token
    )
    gen_s = time.perf_counter() - t1
    sys.stdout.write(stream.flush() + "\n")
    sys.stdout.flush()
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


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        if args.max_new_tokens < 0:
            raise SwarmError("--max-new-tokens must be >= 0")
        if args.local:
            run_local(args)
        elif args.initial_peers:
            code = run_distributed(args)
            if code:
                sys.exit(code)
        else:
            raise SwarmError("give --local to run here, or --initial-peers MADDR to use a swarm")
    except (SwarmError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
