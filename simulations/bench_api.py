"""API benchmark: requests/s and tokens/s through `swarm-api` with 1, 4 and 16 concurrent clients,
and the latency the API adds over the Python client on the same swarm.

Run `python -m simulations.bench_api [--json]`: starts a local swarm (two peers), `swarm-api` in
front of it, and drives it with the official `openai` client; one table (or one JSON object).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

from simulations.cli_help import DefaultsHelpFormatter
from simulations.demo_swarm import LocalSwarm, Proc
from simulations.progress import Progress
from swarm.dht import make_dht

PROMPT = "The quick brown fox"


def api_url(proc: Proc, timeout: float = 120.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in proc.out_path.read_text(errors="replace").splitlines():
            if "OpenAI API at " in line:
                return line.split("OpenAI API at ", 1)[1].split()[0].removesuffix(",")
        if not proc.alive():
            break
        time.sleep(0.2)
    raise RuntimeError(f"swarm-api printed no address:\n{proc.tail()}")


def latencies(client, model_name: str, boot: list[str], tokens: int, repeats: int) -> dict:
    """Median seconds of one greedy request of `tokens` new tokens, through the Python client
    and through the API, taken in turns so that the machine's load falls on both alike."""
    from petals_like.model import DistributedModelForCausalLM

    py, api, got = [], [], 0
    with DistributedModelForCausalLM.from_pretrained(model_name, boot, compression="none") as m:
        ids = m.tokenizer.encode(PROMPT)
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            m.generate(ids, max_new_tokens=tokens, stop_on_eos=False)
            t1 = time.perf_counter()
            r = client.completions.create(
                model=m.model_prefix, prompt=PROMPT, max_tokens=tokens, temperature=0
            )
            t2 = time.perf_counter()
            got = r.usage.completion_tokens
            if i:  # the first warms routes and caches
                py.append(t1 - t0)
                api.append(t2 - t1)
    return {"python": statistics.median(py), "api": statistics.median(api), "tokens": got}


def load(client, model: str, clients: int, per_client: int, tokens: int) -> dict:
    """`clients` threads, each sending `per_client` chat requests back to back (temperature 0.7)."""
    done: list[int] = []
    errors: list[str] = []
    lock = threading.Lock()

    def worker(k: int) -> None:
        for i in range(per_client):
            try:
                r = client.chat.completions.create(
                    model=model,
                    messages=[{"role": "user", "content": f"Tell me about bees ({k}.{i})"}],
                    max_tokens=tokens,
                    temperature=0.7,
                    seed=k * 1000 + i,
                )
                with lock:
                    done.append(r.usage.completion_tokens)
            except Exception as e:  # counted, not fatal: the figure says how many failed
                with lock:
                    errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {
        "clients": clients,
        "requests": len(done),
        "failed": len(errors),
        "requests_per_s": round(len(done) / wall, 3),
        "tokens_per_s": round(sum(done) / wall, 2),
        "wall_s": round(wall, 2),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=DefaultsHelpFormatter
    )
    p.add_argument("--model", default="smollm2-135m", help="what the peers serve")
    p.add_argument("--tokens", type=int, default=16, help="new tokens per request")
    p.add_argument("--repeats", type=int, default=5, help="latency requests per client kind")
    p.add_argument("--per-client", type=int, default=3, help="requests per concurrent client")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16], help="clients at once")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--log-dir", type=Path, default=None, help="keep the processes' logs here")
    args = p.parse_args(argv)
    import openai

    from swarm.model.loading import load_config, resolve_model

    progress = Progress("bench_api")
    source = resolve_model(args.model)
    n = load_config(source).num_layers
    swarm = LocalSwarm(args.model, args.log_dir)
    api = None
    try:
        progress.update("starting the swarm: a bootstrap and two peers")
        boot = swarm.start_bootstrap()
        half = n // 2
        for span in (f"0:{half}", f"{half}:{n}"):
            swarm.start_peer("--stage", span, "--quant", "none").maddrs(120)

        dht = make_dht(initial_peers=boot, client_mode=True, start=True)
        swarm.wait_online(dht, source.name, n, 2, 300)
        dht.shutdown()
        api = Proc(
            "api",
            ["-m", "petals_like.api.cli", "--initial-peers", *boot, "--model", args.model]
            + ["--port", "0", "--compression", "none"],
            swarm.log_dir,
        )
        url = api_url(api)
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=300)
        progress.update(f"latency: {args.repeats} greedy requests of {args.tokens} tokens each way")
        lat = latencies(client, args.model, boot, args.tokens, args.repeats)
        py_s, api_s, got = lat["python"], lat["api"], lat["tokens"]
        rows = []
        for c in args.concurrency:
            progress.update(f"load: {c} concurrent clients x {args.per_client} requests")
            rows.append(load(client, source.name, c, args.per_client, args.tokens))
    finally:
        if api is not None:
            api.stop()
        swarm.close()
    result = {
        "model": source.name,
        "tokens_per_request": args.tokens,
        "python_client_s": round(py_s, 4),
        "api_s": round(api_s, 4),
        "api_added_ms": round((api_s - py_s) * 1000, 2),
        "api_added_ms_per_token": round((api_s - py_s) * 1000 / max(1, got), 3),
        "load": rows,
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(
        f"{result['model']}: a greedy request of {args.tokens} tokens takes "
        f"{py_s * 1000:.0f} ms through the Python client, {api_s * 1000:.0f} ms through the API "
        f"(+{result['api_added_ms']:.1f} ms, {result['api_added_ms_per_token']:.2f} ms per token)"
    )
    print(f"{'clients':>7} {'requests':>8} {'failed':>6} {'req/s':>7} {'tok/s':>7} {'wall s':>7}")
    for r in rows:
        print(
            f"{r['clients']:>7} {r['requests']:>8} {r['failed']:>6} {r['requests_per_s']:>7.2f} "
            f"{r['tokens_per_s']:>7.1f} {r['wall_s']:>7.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
