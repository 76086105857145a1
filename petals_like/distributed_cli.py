"""`swarm-generate --initial-peers ...`: generate through the swarm, streaming text to stdout.

Called by petals_like.cli (its distributed branch), which also adds the flags defined here.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import torch

from petals_like.console import PrefillProgress, cut_notice
from petals_like.verify import DEFAULT_FRACTION
from swarm.errors import SwarmError

logger = logging.getLogger(__name__)


def add_distributed_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the distributed client that the local run does not have."""
    parser.add_argument(
        "--compression",
        default="auto",
        help="activation codec on the wire: auto (per peer, by its measured link: exact fp32 "
        "unless that costs over a tenth of a step, then int8-block64), none (exact fp32) or a "
        "codec name such as int8-block64 (default: %(default)s)",
    )
    parser.add_argument(
        "--adapter",
        metavar="DIR",
        help="generate with this adapter: a PEFT LoRA folder or soft prompts saved by "
        "swarm-finetune (sent to the peers once per session)",
    )
    parser.add_argument(
        "--no-push",
        action="store_true",
        help="relay every hop through this client instead of peers pushing each step's output "
        "to the next peer (push costs hops + 1 one-way delays a token, relay 2 x hops)",
    )
    parser.add_argument(
        "--no-direct",
        action="store_true",
        help="reach peers through libp2p only, not on the direct channels they announce "
        "(plain TCP keyed over libp2p, without the p2pd daemons' two extra hops)",
    )
    parser.add_argument(
        "--link-delay",
        type=float,
        default=0.0,
        help="WAN emulation: seconds added to every message this client sends to a peer (one "
        "way; give peers the same with `swarm-peer join --link-delay`; default 0)",
    )
    parser.add_argument(
        "--link-bandwidth",
        type=float,
        default=0.0,
        help="WAN emulation: this client's uplink in Mbit/s (default 0: no cap)",
    )


def _summary(model, args: argparse.Namespace, prompt_len: int, load_s: float) -> str:
    from petals_like.routing import describe

    st = model.last_stats
    lines = [
        f"model {model.model_prefix}: joined in {load_s:.2f}s, prompt {prompt_len} tokens, "
        f"generated {st.new_tokens} tokens in {st.total_s:.2f}s, first token "
        f"{st.first_token_s * 1000:.0f} ms, {st.decode_tokens_per_s:.1f} tokens/s",
        f"route: {describe(st.route)} (compression {getattr(args, 'compression', 'auto')}: "
        f"{', '.join(model.router.codec_for(h.peer_id) for h in st.route)})",
    ]
    if st.speculative is not None:
        lines.append(st.speculative.summary(args.speculative))
    lines += [f"failover: {f.summary()}" for f in st.failovers]
    if not st.failovers:
        lines.append("failover: none")
    if model.verify:
        alone = ", ".join(f"{a}:{b}" for a, b in st.unverifiable)
        lines.append(
            f"verify: {model.verify:g} of steps, {st.verify_checks} hop checks, "
            f"{len(st.liars)} liar{'s' * (len(st.liars) != 1)}"
            + (f", {st.regenerated} tokens regenerated" if st.regenerated else "")
            + (f"; no second replica for blocks {alone}" if alone else "")
        )
        lines += [f"liar: {liar.summary()}" for liar in st.liars]
        lines += [f"verify: {msg}" for msg in st.unsettled]
    return "\n".join(lines)


def run_distributed(args: argparse.Namespace) -> int:
    """Generate through the swarm at `args.initial_peers`; returns the process exit code.

    Reads the flags of swarm-generate (prompt, model, initial_peers, max_new_tokens, temperature,
    top_k, top_p, repetition_penalty, seed, chat) and, if present, compression, link_delay,
    link_bandwidth, adapter and verify.
    The continuation streams to stdout; the summary (tokens/s, route, failovers) to stderr.
    """
    from petals_like.model import DistributedModelForCausalLM
    from petals_like.router import RouterConfig
    from swarm.model.tokenizer import StreamDecoder

    t0 = time.perf_counter()
    router_config = RouterConfig(
        push=not getattr(args, "no_push", False), direct=not getattr(args, "no_direct", False)
    )
    model = DistributedModelForCausalLM.from_pretrained(
        args.model,
        args.initial_peers,
        compression=getattr(args, "compression", "auto"),
        link_delay=getattr(args, "link_delay", 0.0),
        link_bandwidth=getattr(args, "link_bandwidth", 0.0),
        adapter=getattr(args, "adapter", None),
        verify=getattr(args, "verify", DEFAULT_FRACTION),
        router_config=router_config,
    )
    load_s = time.perf_counter() - t0
    try:
        tokenizer = model.tokenizer
        if tokenizer is None:
            raise SwarmError(f"model {args.model} has no tokenizer")
        prompt = args.prompt
        if getattr(args, "chat", False):
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        prompt_ids = tokenizer.encode(prompt)
        stream = StreamDecoder(tokenizer)

        def on_token(token: torch.Tensor) -> None:
            sys.stdout.write(stream.push(int(token[0])))
            sys.stdout.flush()

        out = model.generate(
            torch.tensor([prompt_ids], dtype=torch.long),
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=getattr(args, "top_k", 0),
            top_p=args.top_p,
            repetition_penalty=getattr(args, "repetition_penalty", 1.0),
            seed=args.seed,
            on_token=on_token,
            on_prefill=PrefillProgress(),
            speculative=getattr(args, "speculative", None),
        )
        sys.stdout.write(stream.flush() + "\n")
        sys.stdout.flush()
        generated = out.shape[1] - len(prompt_ids)
        context = model.config.max_position_embeddings
        notice = cut_notice(args.max_new_tokens, generated, len(prompt_ids), context)
        if notice:
            print(notice, file=sys.stderr)
        print(_summary(model, args, len(prompt_ids), load_s), file=sys.stderr)
        return 0
    except (SwarmError, ValueError, TimeoutError):
        # The error line comes from the CLI; what was generated until then is summed up first.
        sys.stdout.write("\n")
        sys.stdout.flush()
        if model.last_stats.new_tokens:
            print(_summary(model, args, 0, load_s), file=sys.stderr)
        raise
    finally:
        model.close()
