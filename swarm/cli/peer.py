"""The `swarm-peer` CLI: `join` serves a span of blocks, `status` shows who serves what.

Entry point `swarm.cli.peer:main` (pyproject). Flags and defaults of `join` come from PeerConfig.
"""

from __future__ import annotations

import argparse
import json
import sys

from swarm.cli.console import run_main, setup_logging
from swarm.cli.options import add_config_options, config_from_args
from swarm.dht import make_dht
from swarm.peer.config import PeerConfig
from swarm.peer.records import format_blocks
from swarm.procs import reap_children_on_exit


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swarm-peer", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", required=True)
    join = sub.add_parser("join", help="join (or start) a swarm and serve a span of blocks")
    add_config_options(join, PeerConfig)
    status = sub.add_parser(
        "status", help="show which peers serve which blocks, and what nobody serves"
    )
    status.add_argument("--initial-peers", nargs="+", required=True, help="a peer's multiaddr")
    status.add_argument(
        "--model",
        default=None,
        help="model name or path (default: every model the swarm announces)",
    )
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.add_argument("--timeout", type=float, default=10.0, help="DHT timeout in seconds")
    status.add_argument(
        "--web", action="store_true", help="serve the live dashboard page instead of printing"
    )
    status.add_argument("--host", default="127.0.0.1", help="--web: address to listen on")
    status.add_argument(
        "--port", type=int, default=8080, help="--web: port to listen on, 0 for any free one"
    )
    return parser


def _print_maddrs(maddrs: list[str]) -> None:
    # The contract others script against: one multiaddr per line on stdout.
    for m in maddrs:
        print(m)
    sys.stdout.flush()


def join(args: argparse.Namespace) -> int:
    from swarm.peer.server import Peer

    config = config_from_args(PeerConfig, args)
    reap_children_on_exit()
    if config.train:
        from swarm.training.peer import TrainingPeer

        peer = TrainingPeer(config, on_maddrs=_print_maddrs)
    else:
        peer = Peer(config, on_maddrs=_print_maddrs)
    return peer.run()


def _print_table(table: dict) -> None:
    peers = table["peers"]
    n = len({p["peer_id"] for p in peers})
    print(f"model {table['model']}: {table['num_blocks']} blocks, {n} peer{'s' * (n != 1)}")
    head = f"{'peer':<12} {'span':>7}  {'state':<8} {'reach':<7} {'tok/s':>8} {'cache left':>10}"
    print(f"{head}  role")
    for p in peers:
        # Training peers serve a stage of a run; their cache and tok/s mean nothing to clients.
        role = f"training run {p['run_id']}" if p["run_id"] else "inference"
        cache = "-" if p["run_id"] else str(p["cache_tokens_left"])
        print(
            f"..{p['peer_id'][-10:]:<10} {p['start']:>3}:{p['end']:<3}  {p['state']:<8} "
            f"{p['reachability']:<7} {p['throughput']:>8.1f} {cache:>10}  {role}"
        )
    live = [[p for p in b["peers"] if p["state"] != "offline"] for b in table["blocks"]]
    if table["uncovered"]:
        print(f"coverage: blocks {format_blocks(table['uncovered'])} are served by nobody")
    else:
        least = min((len(b) for b in live), default=0)
        print(f"coverage: every block served, by at least {least} peer{'s' * (least != 1)}")


def status(args: argparse.Namespace) -> int:
    from swarm.dashboard.snapshot import fetch_tables
    from swarm.net import check_initial_peers

    check_initial_peers(args.initial_peers)
    reap_children_on_exit()
    if args.web:
        from swarm.dashboard.web import serve_dashboard

        def listening(url: str) -> None:
            print(f"dashboard at {url}/", flush=True)

        return serve_dashboard(
            args.initial_peers, args.model, args.host, args.port, args.timeout, listening
        )
    dht = make_dht(initial_peers=args.initial_peers, client_mode=True, start=True)
    try:
        tables = fetch_tables(dht, args.model, args.timeout)
    finally:
        dht.shutdown()
    if not tables:
        what = f"model {args.model!r} is not" if args.model else "no model is"
        print(f"swarm-peer: error: {what} announced in this swarm", file=sys.stderr)
        return 1
    if args.json:
        out = tables[0] if len(tables) == 1 else {"models": tables}
        print(json.dumps(out))
    else:
        for table in tables:
            _print_table(table)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(args.verbose)
    return run_main("swarm-peer", lambda: join(args) if args.command == "join" else status(args))


if __name__ == "__main__":
    sys.exit(main())
