"""The `swarm-api` command: OpenAI's API and the live dashboard for one model of a swarm.

Entry point `petals_like.api.cli:main` (pyproject); flags and defaults come from ApiConfig.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass, field

import swarm.cli  # noqa: F401, I001 - first: bounds OpenMP spin before torch is imported
from petals_like.verify import DEFAULT_FRACTION
from swarm.cli.console import run_main, setup_logging
from swarm.cli.options import add_config_options, config_from_args
from swarm.errors import BadRequest
from swarm.model.loading import DEFAULT_MODEL

logger = logging.getLogger(__name__)


@dataclass
class ApiConfig:
    """What `swarm-api` serves and how; its flags are generated from these fields."""

    initial_peers: list[str] = field(
        default_factory=list, metadata={"help": "multiaddrs of peers of the swarm (required)"}
    )
    model: str = field(
        default=DEFAULT_MODEL,
        metadata={"help": "the model served: HF folder, .gguf file or alias"},
    )
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on"})
    port: int = field(default=8000, metadata={"help": "port to listen on, 0 for any free one"})
    max_concurrent: int = field(
        default=16,
        metadata={"help": "most generations at once; more requests wait for a free slot"},
    )
    default_max_tokens: int = field(
        default=512,
        metadata={"help": "new tokens of a chat request that sets no max_tokens"},
    )
    compression: str = field(
        default="auto",
        metadata={"help": "activation codec on the wire: auto, none or a codec name"},
    )

    verify: float = field(
        default=DEFAULT_FRACTION,
        metadata={
            "help": "share of steps re-run on another replica of each span and compared "
            "(0: off, 1: every step); liars are banned and their tokens generated again"
        },
    )

    def __post_init__(self) -> None:
        if not self.initial_peers:
            raise BadRequest("--initial-peers needs the multiaddr of a peer of the swarm")
        if self.max_concurrent < 1 or self.default_max_tokens < 1:
            raise BadRequest("--max-concurrent and --default-max-tokens must be >= 1")
        if not 0.0 <= self.verify <= 1.0:
            raise BadRequest(f"--verify must be a fraction in [0, 1], got {self.verify}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="swarm-api",
        description="Serve the OpenAI API (/v1/completions, /v1/chat/completions) and a live "
        "dashboard (/) for a model of the swarm.",
    )
    add_config_options(p, ApiConfig)
    p.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    return p


def serve(config: ApiConfig) -> int:
    from petals_like.api.app import create_app
    from petals_like.api.engine import Engine
    from petals_like.model import DistributedModelForCausalLM
    from swarm.dashboard.snapshot import fetch_tables
    from swarm.dashboard.web import CachedSnapshot, listening_socket, run_server
    from swarm.procs import reap_children_on_exit

    listening_socket(config.host, config.port).close()  # a taken port fails before joining
    reap_children_on_exit()
    model = DistributedModelForCausalLM.from_pretrained(
        config.model, config.initial_peers, compression=config.compression, verify=config.verify
    )
    engine = Engine(model, config.max_concurrent, config.default_max_tokens)
    try:
        prefix = model.model_prefix

        def read() -> list[dict]:
            return fetch_tables(model.dht, prefix, rtts=dict(model.router.rtts))

        app = create_app(engine, prefix, (config.model,), dashboard=CachedSnapshot(read))

        def listening(url: str) -> None:
            # Scripts and tests read this line for the address (port 0 picks a free one).
            print(f"serving {prefix}: OpenAI API at {url}/v1, dashboard at {url}/", flush=True)

        run_server(app, config.host, config.port, listening)
    finally:
        engine.close()
        model.close()
    return 0


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose, logging.WARNING)
    sys.exit(run_main("swarm-api", lambda: serve(config_from_args(ApiConfig, args))))


if __name__ == "__main__":
    main()
