"""What signed DHT records cost: one peer storing its span's records and a client reading every
block, on three real DHT nodes on 127.0.0.1, with signatures (make_dht) and without (plain DHT).

Run: python -m simulations.bench_signing [--blocks N] [--peers P] [--rounds R] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import hivemind

from simulations.cli_help import DefaultsHelpFormatter
from swarm.dht import make_dht
from swarm.peer.dht_view import dht_time, fetch_swarm_async, store_records_async
from swarm.peer.records import SpanRecord
from swarm.signing import fresh_identity

LOCAL = ["/ip4/127.0.0.1/tcp/0"]


def _nodes(signed: bool, peers: int) -> list[hivemind.DHT]:
    """A bootstrap node, `peers` writers and one client-mode reader (all made before any loop)."""

    def plain(**kw) -> hivemind.DHT:  # RSA ids as make_dht's (p2pd's own are Ed25519)
        return hivemind.DHT(
            start=True, identity_path=fresh_identity(), check_if_identity_free=False, **kw
        )

    make = make_dht if signed else plain
    boot = make(host_maddrs=LOCAL)
    maddrs = [str(m) for m in boot.get_visible_maddrs()]
    writers = [make(initial_peers=maddrs, host_maddrs=LOCAL) for _ in range(peers)]
    return [boot, *writers, make(initial_peers=maddrs, client_mode=True)]


async def _measure(nodes: list[hivemind.DHT], blocks: int, rounds: int) -> dict:
    writers, reader = nodes[1:-1], nodes[-1]
    stores, gets = [], []
    for _ in range(rounds):
        for w in writers:
            pid = w.peer_id.to_base58()
            record = SpanRecord(pid, 0, blocks, throughput=100.0, addrs=("/ip4/127.0.0.1/tcp/1",))
            t = time.perf_counter()
            assert await store_records_async(
                w, "bench", range(blocks), record, dht_time() + 60, 30.0
            )
            stores.append(time.perf_counter() - t)
        t = time.perf_counter()
        found = await fetch_swarm_async(reader, "bench", blocks, 30.0)
        gets.append(time.perf_counter() - t)
        assert len(found) == len(writers), found
    return {
        "store_ms": round(1000 * statistics.median(stores), 2),
        "get_ms": round(1000 * statistics.median(gets), 2),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--blocks", type=int, default=30, help="blocks in the span stored")
    parser.add_argument("--peers", type=int, default=4, help="peers storing a record per block")
    parser.add_argument("--rounds", type=int, default=10, help="measured rounds (median kept)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    out = {"blocks": args.blocks, "peers": args.peers, "rounds": args.rounds}
    for signed in (False, True):
        nodes = _nodes(signed, args.peers)
        try:
            out["signed" if signed else "unsigned"] = asyncio.run(
                _measure(nodes, args.blocks, args.rounds)
            )
        finally:
            for node in reversed(nodes):
                node.shutdown()
    if args.json:
        print(json.dumps(out))
    else:
        for mode in ("unsigned", "signed"):
            m = out[mode]
            print(f"{mode:8s} store {args.blocks} blocks {m['store_ms']} ms, get {m['get_ms']} ms")


if __name__ == "__main__":
    main()
