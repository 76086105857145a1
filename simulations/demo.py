"""Demo: the embedded SmolLM2-135M-Instruct answers a fixed question, generated in this process.

Run as `python -m simulations.demo` (no swarm; `make demo` runs simulations.demo_swarm); prints
the answer and a one-line summary.
"""

from __future__ import annotations

import argparse
import sys
import time

from simulations.progress import Progress
from swarm.errors import SwarmError
from swarm.generation import SamplingConfig, generate_local
from swarm.model.loading import DEFAULT_MODEL, load_model, load_tokenizer, resolve_model
from swarm.model.tokenizer import StreamDecoder
from swarm.quant import QUANT_MODES

QUESTION = "What are three good reasons to learn to cook at home?"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--quant", choices=QUANT_MODES, default="none")
    args = p.parse_args(argv)
    try:
        t0 = time.perf_counter()
        source = resolve_model(args.model)
        with Progress("demo") as progress:
            progress.update(f"loading {source.name} ({args.quant} weights)")
            tok, model = load_tokenizer(source), load_model(source, quant=args.quant)
        load_s = time.perf_counter() - t0
        prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": QUESTION}]))
        print(f"Q: {QUESTION}\nA: ", end="", flush=True)
        stream = StreamDecoder(tok)
        t1 = time.perf_counter()
        out = generate_local(
            model,
            tok,
            prompt,
            args.max_new_tokens,
            SamplingConfig(repetition_penalty=1.1),
            on_token=lambda t: print(stream.push(t), end="", flush=True),
        )
        gen_s = time.perf_counter() - t1
        print(stream.flush())
        print(
            f"[{source.name}, {args.quant}: load {load_s:.1f}s, {len(out)} tokens in {gen_s:.1f}s]",
            file=sys.stderr,
        )
    except SwarmError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
