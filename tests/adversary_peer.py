"""A lying peer for the verification tests: a real swarm.peer Peer whose outputs are wrong.

Run as a prefix of the peer's own command line, as `ip netns exec` is (tests.conftest.PeerProcess
`prefix=`): `python -m tests.adversary_peer --mode-file F python -m swarm.cli.peer join ...`.
F holds the mode, read at every step so that one process serves every test: "honest", "corrupt"
(every output), "corrupt20" (every fifth step of a session, the third first) or "echo" (the
input back). Its forward (what checkers run) lies the same way. Test-only: no production switch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import swarm.cli  # noqa: F401 - bounds OpenMP spin (GOMP_SPINCOUNT) before torch loads
from swarm.cli.console import run_main, setup_logging
from swarm.cli.options import add_config_options, config_from_args
from swarm.peer.backend import SpanBackend, StepItem
from swarm.peer.config import PeerConfig
from swarm.peer.server import Peer
from swarm.procs import reap_children_on_exit

MODES = ("honest", "corrupt", "corrupt20", "echo")


class LyingBackend(SpanBackend):
    """SpanBackend whose replies follow the mode in `mode_file`."""

    def __init__(self, span, dtype: torch.dtype, mode_file: Path):
        super().__init__(span, dtype)
        self.mode_file = mode_file
        self.steps: dict[str, int] = {}  # steps served per session
        self.forwards = 0

    def mode(self) -> str:
        try:
            mode = self.mode_file.read_text().strip()
        except OSError:
            return "honest"
        return mode if mode in MODES else "honest"

    def _lie(self, x: torch.Tensor, out: torch.Tensor, n: int) -> torch.Tensor:
        mode = self.mode()
        if mode == "echo":
            return x.to(out.dtype).clone()
        if mode == "corrupt" or (mode == "corrupt20" and n % 5 == 2):
            g = torch.Generator().manual_seed(n)
            noise = torch.randn(out.shape, generator=g, dtype=out.dtype)
            return out + noise * out.std()  # about 100% relative error: plausible in scale
        return out

    def inference_step(self, items: list[StepItem]) -> list[torch.Tensor]:
        outs = super().inference_step(items)
        lied = []
        for item, out in zip(items, outs, strict=True):
            n = self.steps.get(item.session.session_id, 0)
            self.steps[item.session.session_id] = n + 1
            lied.append(self._lie(item.hidden, out, n))
        return lied

    def forward(self, hidden: torch.Tensor, first: int, last: int, adapter=None, seed: int = 0):
        out = super().forward(hidden, first, last, adapter, seed)
        self.forwards += 1
        return self._lie(hidden, out, self.forwards)


class LyingPeer(Peer):
    def __init__(self, config: PeerConfig, mode_file: Path, **kw):
        super().__init__(config, **kw)
        self.mode_file = mode_file

    async def _load(self, start: int, end: int) -> SpanBackend:
        honest = await super()._load(start, end)
        return LyingBackend(honest.span, honest.dtype, self.mode_file)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    head = argparse.ArgumentParser(prog="adversary_peer", allow_abbrev=False)
    head.add_argument("--mode-file", type=Path, required=True)
    args, rest = head.parse_known_args(argv)
    if "join" not in rest:
        head.error("expected the peer's command line: ... swarm.cli.peer join ARGS")
    join = argparse.ArgumentParser(prog="adversary_peer join")
    add_config_options(join, PeerConfig)
    config = config_from_args(PeerConfig, join.parse_args(rest[rest.index("join") + 1 :]))
    setup_logging(False)
    reap_children_on_exit()

    def print_maddrs(maddrs: list[str]) -> None:
        for m in maddrs:
            print(m)
        sys.stdout.flush()

    return run_main(
        "adversary_peer", lambda: LyingPeer(config, args.mode_file, on_maddrs=print_maddrs).run()
    )


if __name__ == "__main__":
    sys.exit(main())
