"""The `swarm-peer` CLI: `join` serves a span of blocks, `status` shows who serves what.

Entry point `swarm.cli.peer:main` (pyproject). Flags and defaults of `join` come from PeerConfig.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from swarm.cli.options import add_config_options, config_from_args
from swarm.peer.config import HELP, PeerConfig


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swarm-peer", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", required=True)
    join = sub.add_parser("join", help="join (or start) a swarm and serve a span of blocks")
    add_config_options(join, PeerConfig, HELP)
    status = sub.add_parser("status", help="show every block and the peers serving it")
    status.add_argument("--initial-peers", nargs="+", required=True, help="a peer's multiaddr")
    status.add_argument(
        "--model",
        default=None,
        help="model name or path (default: every model the swarm announces)",
    )
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.add_argument("--timeout", type=float, default=10.0, help="DHT timeout in seconds")
    return parser


def _print_maddrs(maddrs: list[str]) -> None:
    # The contract others script against: one multiaddr per line on stdout.
    for m in maddrs:
        print(m)
    sys.stdout.flush()


def join(args: argparse.Namespace) -> int:
    from swarm.peer.server import Peer

    config = config_from_args(PeerConfig, args)
    try:
        if config.train:
            from swarm.training.peer import TrainingPeer

            peer = TrainingPeer(config, on_maddrs=_print_maddrs)
        else:
            peer = Peer(config, on_maddrs=_print_maddrs)
    except ValueError as e:
        print(f"swarm-peer: {e}", file=sys.stderr)
        return 2
    return peer.run()


def swarm_table(model: str, num_blocks: int, records: list) -> dict:
    """The status JSON object: every block with the peers whose span covers it."""
    blocks = []
    for i in range(num_blocks):
        peers = [
            {
                "peer_id": r.peer_id,
                "start": r.start,
                "end": r.end,
                "state": r.state,
                "throughput": round(r.throughput, 3),
                "cache_tokens_left": r.cache_tokens_left,
            }
            for r in records
            if r.start <= i < r.end
        ]
        blocks.append({"index": i, "peers": peers})
    return {"model": model, "num_blocks": num_blocks, "blocks": blocks}


def _print_table(table: dict) -> None:
    print(f"model {table['model']}: {table['num_blocks']} blocks")
    print(f"{'block':>5}  {'peer':<10} {'span':>7} {'state':<8} {'tok/s':>9} {'cache left':>10}")
    uncovered = []
    for block in table["blocks"]:
        serving = [p for p in block["peers"] if p["state"] != "offline"]
        if not serving:
            uncovered.append(block["index"])
        if not block["peers"]:
            print(f"{block['index']:>5}  {'-- nobody --':<10}")
        for p in block["peers"]:
            span = f"{p['start']}:{p['end']}"
            print(
                f"{block['index']:>5}  {p['peer_id'][-8:]:<10} {span:>7} {p['state']:<8} "
                f"{p['throughput']:>9.1f} {p['cache_tokens_left']:>10}"
            )
    print("uncovered blocks: " + (", ".join(map(str, uncovered)) if uncovered else "none"))


def status(args: argparse.Namespace) -> int:
    import hivemind

    from swarm.errors import PeerUnavailable
    from swarm.peer.dht_view import fetch_models, fetch_swarm

    dht = hivemind.DHT(initial_peers=args.initial_peers, client_mode=True, start=True)
    try:
        models = fetch_models(dht, timeout=args.timeout)
        if args.model:
            wanted = {args.model}
            try:
                from swarm.model.loading import resolve_model

                wanted.add(resolve_model(args.model).name)
            except Exception:  # a name only the swarm knows is fine
                pass
            models = [m for m in models if m.prefix in wanted]
        if not models:
            print("swarm-peer: no model is announced in this swarm", file=sys.stderr)
            return 1
        tables = [
            swarm_table(
                m.prefix, m.num_blocks, fetch_swarm(dht, m.prefix, m.num_blocks, args.timeout)
            )
            for m in models
        ]
    except PeerUnavailable as e:
        print(f"swarm-peer: {e}", file=sys.stderr)
        return 1
    finally:
        dht.shutdown()
    if args.json:
        out = tables[0] if len(tables) == 1 else {"models": tables}
        print(json.dumps(out))
    else:
        for table in tables:
            _print_table(table)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.command == "join":
        return join(args)
    return status(args)


if __name__ == "__main__":
    sys.exit(main())
