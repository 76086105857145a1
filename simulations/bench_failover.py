"""Failover benchmark with the default settings: SIGKILL the middle peer mid-generation.

Run `python -m simulations.bench_failover [--json]`: int8 peers, `--compression auto`, push,
exact replay, verify 0.1; prints the gap to the next sampled token and where it went.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time

from simulations.bench_inference import source_blocks, start_swarm
from swarm.quant import DEFAULT_PEER_QUANT


def trial(model_name: str, boot, swarm, prompt: list[int], new: int, kill_at: int) -> dict:
    """One generation with the defaults whose middle peer is SIGKILLed at sampled token kill_at."""
    from petals_like.model import DistributedModelForCausalLM

    with DistributedModelForCausalLM.from_pretrained(model_name, boot) as model:
        killed: list[float] = []
        count = [0]

        def on_sampled(_t) -> None:
            count[0] += 1
            if kill_at and count[0] == kill_at:
                session = model._active_sessions[-1]
                middle = session.route[len(session.route) // 2].peer_id
                proc = next(p for p in swarm.procs if p.name != "bootstrap" and p.peer_id == middle)
                proc.kill(signal.SIGKILL, group=False)  # a crash: its p2pd lives on
                killed.append(time.monotonic())

        with model.inference_session(max_length=len(prompt) + new):
            out = model.generate(
                prompt, max_new_tokens=new, stop_on_eos=False, on_sampled=on_sampled
            )
        st = model.last_stats
        codec_wait = {str(p)[-6:]: round(s * 1000, 1) for p, s in model.router.codec_wait.items()}
    times = st.token_times
    result = {"tokens": out[0, len(prompt) :].tolist(), "codec_wait_ms": codec_wait}
    if kill_at:
        steps = sorted(b - a for a, b in zip(times[1:kill_at], times[2 : kill_at + 1], strict=True))
        f = st.failovers[0] if st.failovers else None
        result.update(
            gap_ms=(times[kill_at] - killed[0]) * 1000,
            median_step_ms=steps[len(steps) // 2] * 1000,
            detect_ms=None if f is None else (f.started - killed[0]) * 1000,
            phases_ms=None if f is None else {k: v * 1000 for k, v in f.phases.items()},
            replayed=None if f is None else f.replayed_tokens,
            failovers=[x.summary() for x in st.failovers],
        )
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m simulations.bench_failover", description=__doc__)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--prompt", default="The three primary colors are red, yellow and")
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--kill-at", type=int, default=24, help="sampled token at which to kill")
    p.add_argument("--trials", type=int, default=2, help="kills, one per run (a backup each)")
    p.add_argument("--quant", default=DEFAULT_PEER_QUANT, help="the peers' weights")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    from swarm.model.loading import load_tokenizer, resolve_model

    source = resolve_model(args.model)
    n = source_blocks(source)
    thirds = [f"{i * n // 3}:{(i + 1) * n // 3}" for i in range(3)]
    prompt = load_tokenizer(source).encode(args.prompt)
    swarm, boot = start_swarm(args.model, args.quant, thirds + [thirds[1]] * args.trials, n,
                              source.name)  # fmt: skip
    try:
        ref = trial(args.model, boot, swarm, prompt, args.new_tokens, 0)
        results = []
        for i in range(args.trials):
            r = trial(args.model, boot, swarm, prompt, args.new_tokens, args.kill_at)
            r["same_tokens"] = r.pop("tokens") == ref["tokens"]
            results.append(r)
            print(
                f"trial {i}: next token {r['gap_ms']:.0f} ms after SIGKILL (median step "
                f"{r['median_step_ms']:.0f} ms), seen after {r['detect_ms']:.0f} ms, replayed "
                f"{r['replayed']}, same tokens {r['same_tokens']}; phases {r['phases_ms']}; "
                f"codec wait {r['codec_wait_ms']}",
                flush=True,
            )
    finally:
        swarm.close()
    if args.json:
        print(json.dumps({"trials": results, "load": os.getloadavg()}))


if __name__ == "__main__":
    main()
