"""Inference benchmark: tokens/s through local peers against --local, failover recovery, WAN delay.

Run `python -m simulations.bench_inference [--json]`; prints one table (and JSON with --json),
the delay column in ms per hop each way.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

from simulations.cli_help import DefaultsHelpFormatter
from simulations.demo_swarm import LocalSwarm, start_local_swarm
from simulations.progress import Progress

# Why the fp32 swarm has more peers than spans (said on stderr and in --help).
PEERS_WHY = (
    "The fp32 swarm runs one peer per third of the blocks plus one backup of the middle third "
    "per failover trial (--failover-trials, default 2: 5 peers), so that each trial can SIGKILL "
    "the middle peer and the session fails over to a backup; the int8 swarm runs 3 peers."
)


@dataclass
class Row:
    """One measured configuration."""

    name: str
    weights: str  # block weights: none (fp32) or int8
    codec: str  # activation codec on the wire
    link_delay_ms: float = 0.0  # one way, on every link (client and peers)
    tokens_per_s: float = 0.0
    first_token_ms: float = 0.0
    vs_local: float = 0.0  # tokens/s over --local with the same weights
    agree_fp32: str = ""  # tokens equal to local fp32 greedy before the first difference
    agree_local: str = ""  # the same against --local with the same weights
    extra: dict = field(default_factory=dict)


def agreement(got: list[int], want: list[int]) -> str:
    n = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), len(want))
    return f"{n}/{len(want)}"


def _stamp(times: list[float]):
    return lambda _token: times.append(time.monotonic())


def run_local(source, quant: str, prompt: list[int], new: int, repeats: int):
    """Best decode tokens/s of generate_local (the --local path) and its tokens."""
    from swarm.generation import generate_local
    from swarm.model.loading import load_model

    model = load_model(source, quant=quant, progress=False)
    best, first_ms, tokens = 0.0, 0.0, []
    for _ in range(repeats):
        times: list[float] = []
        t0 = time.monotonic()
        tokens = generate_local(model, None, prompt, new, stop_on_eos=False, on_token=_stamp(times))
        tps = (len(times) - 1) / (times[-1] - times[0])
        if tps > best:
            best, first_ms = tps, (times[0] - t0) * 1000
    del model
    return best, first_ms, tokens


def run_swarm(
    model_name,
    boot,
    prompt,
    new,
    repeats,
    compression,
    link_delay=0.0,
    speculative=None,
    direct=True,
):
    """Best decode tokens/s through the swarm, first-token ms, tokens, route. direct: the
    client's streams on the peers' direct channels (False: libp2p, as peers without one)."""
    from petals_like.model import DistributedModelForCausalLM
    from petals_like.router import RouterConfig

    with DistributedModelForCausalLM.from_pretrained(
        model_name,
        boot,
        compression=compression,
        link_delay=link_delay,
        router_config=RouterConfig(direct=direct),
    ) as model:
        best, first_ms, tokens, route = 0.0, 0.0, [], []
        for _ in range(repeats):
            out = model.generate(
                prompt, max_new_tokens=new, stop_on_eos=False, speculative=speculative
            )
            st = model.last_stats
            if st.decode_tokens_per_s > best:
                best, first_ms = st.decode_tokens_per_s, st.first_token_s * 1000
                route = [(h.start, h.end) for h in st.route]
            tokens = out[0, len(prompt) :].tolist()
    return best, first_ms, tokens, route


def run_failover(model_name, boot, swarm: LocalSwarm, prompt, new, reference, kill_at: int):
    """Generate, SIGKILL the peer serving the middle span at token `kill_at`; measure the gap."""
    from petals_like.model import DistributedModelForCausalLM

    # on_sampled: tokens as sampled (on_token waits for verification, which hides the gap).
    model = DistributedModelForCausalLM.from_pretrained(model_name, boot, compression="none")
    with model:
        with model.inference_session(max_length=len(prompt) + new) as session:
            killed: list[float] = []
            count = [0]

            def on_sampled(_t) -> None:
                count[0] += 1
                if count[0] == kill_at:
                    middle = session.route[len(session.route) // 2].peer_id
                    proc = next(
                        p for p in swarm.procs if p.name != "bootstrap" and p.peer_id == middle
                    )
                    proc.kill(signal.SIGKILL, group=False)  # a crash: its p2pd lives on
                    killed.append(time.monotonic())

            out = model.generate(
                prompt, max_new_tokens=new, stop_on_eos=False, on_sampled=on_sampled
            )
        st = model.last_stats
    times = st.token_times
    steps = sorted(b - a for a, b in zip(times[1:kill_at], times[2 : kill_at + 1], strict=True))
    return {
        "gap_ms": (times[kill_at] - killed[0]) * 1000,
        "median_step_ms": steps[len(steps) // 2] * 1000,
        "same_tokens": out[0, len(prompt) :].tolist() == reference,
        "failovers": [f.summary() for f in st.failovers],
    }


def run_wan(args, source, spans, local, log) -> list[Row]:
    """A swarm whose every link pays --link-delay one way: plain and speculative greedy, each
    relayed through the client and pushed from peer to peer (server-to-server push)."""
    from swarm.model.loading import load_tokenizer

    d, quant = args.link_delay, args.wan_weights
    prompt = load_tokenizer(source).encode(args.repeat_prompt)
    new = max(8, args.new_tokens // 2)
    log(f"starting {len(spans)} peers ({quant} weights) with --link-delay {d}: {spans}")
    swarm, boot = start_swarm(args.model, quant, spans, source_blocks(source), source.name, d)
    rows: list[Row] = []
    try:
        for push in (False, True):
            rows += _wan_rows(args.model, boot, prompt, new, d, push, local[quant][0], quant, log)
        # Pushed again with the client's streams on libp2p (the peers' pushes stay direct): a
        # direct stream's open pays the TCP handshake, libp2p's none; decode is the other way.
        rows += _wan_rows(
            args.model, boot, prompt, new, d, True, local[quant][0], quant, log, direct=False
        )
    finally:
        swarm.close()
    relay, pushed = (next(r for r in rows if r.name == n) for n in ("wan", "wan-push"))
    libp2p = next(r for r in rows if r.name == "wan-push-libp2p")
    libp2p.extra["same_text_as_direct"] = libp2p.extra.pop("text") == pushed.extra["text"]
    pushed.extra["same_text_as_relay"] = pushed.extra.pop("text") == relay.extra["text"]
    for r in rows:
        r.extra.pop("text", None)
    return rows


def _wan_rows(
    model_name, boot, prompt, new, d, push, local_tps, quant, log, direct=True
) -> list[Row]:
    """Plain and speculative greedy rows (direct=False: plain only, the client on libp2p)."""
    from petals_like.model import DistributedModelForCausalLM
    from petals_like.router import RouterConfig

    rows, plain = [], None
    name = ("wan-push" if push else "wan") + ("" if direct else "-libp2p")
    config = RouterConfig(push=push, direct=direct)
    with DistributedModelForCausalLM.from_pretrained(
        model_name, boot, compression="none", link_delay=d, router_config=config
    ) as model:
        model.generate(prompt, max_new_tokens=2, stop_on_eos=False)  # routes and dials
        for spec in (None, "ngram") if direct else (None,):
            out = model.generate(prompt, max_new_tokens=new, stop_on_eos=False, speculative=spec)
            st = model.last_stats
            toks = out[0, len(prompt) :].tolist()
            hops = len(st.route)
            # A relayed token: a round trip per hop; a pushed one: hops + 1 one-way delays.
            delays = (hops + 1) * d if push else hops * 2 * d
            bound = 1.0 / delays
            # Delays plus the model's own step (local, same weights, this machine): what a
            # token needs.
            with_compute = 1.0 / (delays + 1.0 / local_tps)
            tps = st.decode_tokens_per_s
            extra = {"bound_tokens_per_s": bound, "of_bound": tps / bound, "hops": hops}
            extra["bound_with_compute_tokens_per_s"] = with_compute
            extra["of_bound_with_compute"] = tps / with_compute
            if spec:
                extra["same_text_as_plain"] = toks == plain
                extra["tokens_per_round_trip"] = st.speculative.tokens_per_round
            else:
                plain = extra["text"] = toks
            rows.append(
                Row(
                    name if spec is None else f"{name}+ngram",
                    quant,
                    "none",
                    link_delay_ms=d * 1000,
                    tokens_per_s=tps,
                    first_token_ms=st.first_token_s * 1000,
                    vs_local=tps / local_tps,
                    extra=extra,
                )
            )
            log(
                f"{d * 1000:.0f} ms one way, push {push}, direct {direct}, speculative {spec}: "
                f"{tps:.2f} tok/s"
            )
    return rows


def source_blocks(source) -> int:
    from swarm.model.loading import load_config

    return load_config(source).num_layers


def start_swarm(
    model: str, quant: str, spans: list[str], num_blocks: int, prefix: str, link_delay: float = 0.0
) -> tuple[LocalSwarm, list[str]]:
    """One `quant` peer per span, each link paying `link_delay` s one way (bench_verify, ...)."""
    flags = ("--quant", quant, "--link-delay", str(link_delay))
    return start_local_swarm(model, spans, num_blocks, prefix, *flags)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m simulations.bench_inference",
        description=__doc__.split("\n\n")[0],
        epilog=PEERS_WHY + " Progress goes to stderr at least every 10 s.",
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument("--model", default="smollm2-135m", help="model name or path")
    p.add_argument(
        "--prompt", default="The three primary colors are red, yellow and", help="greedy prompt"
    )
    p.add_argument("--new-tokens", type=int, default=48, help="tokens generated per run")
    p.add_argument("--repeats", type=int, default=2, help="runs per row (the best is kept)")
    p.add_argument(
        "--link-delay",
        type=float,
        default=0.05,
        help="one-way seconds on every link, for the WAN rows (a swarm of its own; 0: none)",
    )
    p.add_argument(
        "--repeat-prompt",
        default="Say it three times: the cat sat on the mat, the cat sat on the mat, the cat",
        help="prompt of the WAN rows, whose continuation repeats it (--speculative ngram)",
    )
    p.add_argument(
        "--failover-trials", type=int, default=2, help="SIGKILLs of the middle peer, one per run"
    )
    p.add_argument("--codec", default="int8-block64", help="the compressed activation codec")
    p.add_argument("--skip-int8-weights", action="store_true", help="only the fp32 swarm")
    p.add_argument(
        "--wan-weights",
        choices=("int8", "none"),
        default="int8",
        help="weights of the WAN rows' peers (int8: what `swarm-peer join` serves by default)",
    )
    p.add_argument("--json", action="store_true", help="also print one JSON object")
    p.add_argument(
        "--wan-only", action="store_true", help="only local (fp32, --wan-weights) and the WAN rows"
    )
    args = p.parse_args(argv)
    with Progress("bench_inference") as progress:
        try:
            bench(args, progress)
        except KeyboardInterrupt:
            print("bench_inference: interrupted; peers stopped", file=sys.stderr)
            sys.exit(130)


def bench(args: argparse.Namespace, progress: Progress) -> None:
    """Every measurement, then the table (and JSON with --json) on stdout."""
    log = progress.update
    from swarm.model.loading import load_config, load_tokenizer, resolve_model

    torch.manual_seed(0)
    source = resolve_model(args.model)
    config = load_config(source)
    n = config.num_layers
    thirds = [f"{i * n // 3}:{(i + 1) * n // 3}" for i in range(3)]
    prompt = load_tokenizer(source).encode(args.prompt)
    new, reps = args.new_tokens, args.repeats
    rows: list[Row] = []
    failovers: list[dict] = []

    log(f"{args.model}: {n} blocks, spans {thirds}, prompt {len(prompt)} tokens, {new} new")
    local = {}
    quants = ("none",) if args.skip_int8_weights or args.wan_only else ("none", "int8")
    wan = (args.wan_weights,) if args.link_delay > 0 else ()
    for quant in dict.fromkeys(("none", *quants, *wan)):  # fp32 first: the others compare to it
        tps, ftm, toks = run_local(source, quant, prompt, new, reps)
        local[quant] = (tps, toks)
        rows.append(
            Row(
                "local",
                quant,
                "-",
                tokens_per_s=tps,
                first_token_ms=ftm,
                vs_local=1.0,
                agree_fp32=agreement(toks, local["none"][1]),
            )
        )
        log(f"local {quant}: {tps:.1f} tok/s")

    for quant in () if args.wan_only else quants:
        # The fp32 swarm gets backups of the middle span for the failover trials.
        middle = thirds[1]
        spans = thirds + ([middle] * args.failover_trials if quant == "none" else [])
        why = "one per span"
        if len(spans) > 3:
            k = args.failover_trials
            why += f" + {k} backup{'s' * (k > 1)} of the middle span for the failover trials"
        log(f"starting {len(spans)} peers ({quant} weights): {spans}; {why}")
        swarm, boot = start_swarm(args.model, quant, spans, n, source.name)
        try:
            # The fp32 rows: on the direct channels, then on libp2p only (same peers).
            runs = [("swarm", "none", True), ("swarm-libp2p", "none", False)]
            for name, codec, direct in runs + [("swarm", args.codec, True)]:
                tps, ftm, toks, route = run_swarm(
                    args.model, boot, prompt, new, reps, codec, direct=direct
                )
                rows.append(
                    Row(
                        name,
                        quant,
                        codec,
                        tokens_per_s=tps,
                        first_token_ms=ftm,
                        vs_local=tps / local[quant][0],
                        agree_fp32=agreement(toks, local["none"][1]),
                        agree_local=agreement(toks, local[quant][1]),
                        extra={"route": route},
                    )
                )
                log(f"{name} {quant}/{codec}: {tps:.1f} tok/s via {route}")
            if quant == "none":
                for trial in range(args.failover_trials):
                    r = run_failover(args.model, boot, swarm, prompt, new, local["none"][1], 12)
                    failovers.append(r)
                    log(
                        f"failover {trial}: next token {r['gap_ms']:.0f} ms after the kill, "
                        f"same tokens {r['same_tokens']}"
                    )
        finally:
            swarm.close()

    if args.link_delay > 0:
        rows += run_wan(args, source, thirds, local, log)

    # Measure --local again after the swarms: on a shared machine the load drifts; keep the best
    # and recompute the ratios against it.
    for quant in list(local):
        tps, _, _ = run_local(source, quant, prompt, new, reps)
        log(f"local {quant} again: {tps:.1f} tok/s")
        best = max(tps, local[quant][0])
        local[quant] = (best, local[quant][1])
        for r in rows:
            if r.weights == quant:
                if r.name == "local":
                    r.tokens_per_s = best
                r.vs_local = r.tokens_per_s / best
    print(
        f"{'run':<12} {'weights':<7} {'codec':<13} {'delay':>7} {'tok/s':>7} {'1st ms':>7} "
        f"{'xlocal':>6} {'=fp32':>6} {'=local':>6}  notes"
    )
    for r in rows:
        delay = f"{r.link_delay_ms:.0f} ms" if r.link_delay_ms else "-"
        notes = ""
        if "of_bound" in r.extra:
            x = r.extra
            kind = "push" if r.name.startswith("wan-push") else "relay"
            notes = f"{kind} bound {x['bound_tokens_per_s']:.2f} tok/s ({x['hops']} hops): "
            notes += f"{x['of_bound']:.0%} of it; "
            notes += f"{x['of_bound_with_compute']:.0%} of delays + local step"
            if "tokens_per_round_trip" in x:
                notes += f"; {x['tokens_per_round_trip']:.2f} tokens per chain round trip"
                notes += f", same text as plain: {x['same_text_as_plain']}"
        print(
            f"{r.name:<12} {r.weights:<7} {r.codec:<13} {delay:>7} "
            f"{r.tokens_per_s:>7.2f} {r.first_token_ms:>7.0f} {r.vs_local:>6.2f} "
            f"{r.agree_fp32:>6} {r.agree_local or '-':>6}  {notes}"
        )
    for i, f in enumerate(failovers):
        print(
            f"failover {i}: next token {f['gap_ms']:.0f} ms after SIGKILL (median step "
            f"{f['median_step_ms']:.0f} ms), same tokens: {f['same_tokens']}"
        )
    if args.json:
        out = {**summary(rows, failovers), "rows": [asdict(r) for r in rows]}
        print(json.dumps({**out, "failovers": failovers, "cpus": os.cpu_count()}))


WAN_KEYS = {  # row name -> its figures' prefix in the JSON summary
    "wan": "wan_plain",
    "wan+ngram": "wan_speculative",
    "wan-push": "wan_push",
    "wan-push+ngram": "wan_push_speculative",
    "wan-push-libp2p": "wan_push_libp2p",
}


def summary(rows: list[Row], failovers: list[dict]) -> dict:
    """The headline figures under names that say what they are (fp32 weights, no codec; the
    WAN rows with the weights they ran, `wan_weights`)."""
    out: dict = {}
    for r in rows:
        wan = r.name.startswith("wan")
        if (r.weights != "none" and not wan) or r.codec not in ("none", "-"):
            continue
        if wan:
            out["wan_weights"] = r.weights
        if r.name == "local":
            out["local_tokens_per_s"] = r.tokens_per_s
        elif r.name in ("swarm", "swarm-libp2p"):
            key = r.name.replace("-", "_")
            out[f"{key}_tokens_per_s"], out[f"{key}_vs_local"] = r.tokens_per_s, r.vs_local
        elif r.name in WAN_KEYS:
            key = WAN_KEYS[r.name]
            out[f"{key}_tokens_per_s"] = r.tokens_per_s
            out[f"{key}_first_token_ms"] = r.first_token_ms
            if "of_bound_with_compute" in r.extra:
                out[f"{key}_of_bound_with_compute"] = r.extra["of_bound_with_compute"]
            if "same_text_as_relay" in r.extra:
                out["wan_push_same_text_as_relay"] = r.extra["same_text_as_relay"]
            if "same_text_as_direct" in r.extra:
                out["wan_push_libp2p_same_text"] = r.extra["same_text_as_direct"]
            out["wan_link_delay_ms"] = r.link_delay_ms
            if "tokens_per_round_trip" in r.extra:
                out[f"{key}_tokens_per_round_trip"] = r.extra["tokens_per_round_trip"]
                out[f"{key}_same_text"] = r.extra["same_text_as_plain"]
    if failovers:
        out["failover_next_token_ms_max"] = max(f["gap_ms"] for f in failovers)
        out["failover_same_text"] = all(f["same_tokens"] for f in failovers)
    return out


if __name__ == "__main__":
    main()
