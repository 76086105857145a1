"""Fixtures of the training tests: a small text, training peer and trainer processes.

Every process runs in its own session and is killed by process group and pid at teardown.
"""

from __future__ import annotations

import copy
import os
import random
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from swarm.dht import make_dht
from swarm.model import ModelConfig
from swarm.procs import kill_tree
from swarm.tiny_checkpoint import TINY_CONFIG, write_tiny_checkpoint
from swarm.training.stage import StageTrainingConfig, TrainableStage
from tests.conftest import REPO, PeerProcess

# A two-block span small enough for in-process replicas on real DHTs (test_stage, test_poisoning).
STAGE_MODEL = ModelConfig(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2
)


def make_stage(dht, span, run_id: str = "t1", **kw) -> TrainableStage:
    """A replica of `span` (copied) in run `run_id`, with quick matchmaking and polling."""
    cfg = StageTrainingConfig(run_id=run_id, **{"matchmaking_time": 1.0, "poll_period": 0.1, **kw})
    return TrainableStage(copy.deepcopy(span), dht, cfg)


STEP_RE = re.compile(r"^step (\d+) loss ([0-9.naninf]+) samples/s ([0-9.]+) retries (\d+)$")
SUMMARY_RE = re.compile(r"\blost=(\d+)")


class TrainerProcess:
    """`swarm-train` in a subprocess; step lines are parsed as they come."""

    def __init__(self, args: list[str], log_path: Path):
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "swarm.cli.train", *args],
            stdout=subprocess.PIPE,
            stderr=self._log,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            cwd=REPO,
            start_new_session=True,
        )
        self.steps: list[tuple[int, float, float, int]] = []
        self.lines: list[str] = []
        self.summary: str | None = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").strip()
            self.lines.append(line)
            m = STEP_RE.match(line)
            if m:
                self.steps.append((int(m[1]), float(m[2]), float(m[3]), int(m[4])))
            elif SUMMARY_RE.search(line):
                self.summary = line

    @property
    def losses(self) -> list[float]:
        return [loss for _, loss, _, _ in self.steps]

    @property
    def lost(self) -> int | None:
        m = SUMMARY_RE.search(self.summary or "")
        return int(m[1]) if m else None

    def wait(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"trainer did not finish in {timeout} s:\n{self.log_tail()}")
        # Its last lines (the summary) may still sit in the pipe: read them all before returning.
        self._reader.join(10)
        return rc

    def log_tail(self, n: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-n:] + self.lines[-10:])

    def kill(self) -> None:
        kill_tree(self.proc)
        self._log.close()


@pytest.fixture
def dhts():
    """Four real hivemind DHTs in this process, joined through the first."""
    first = make_dht(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    maddrs = [str(a) for a in first.get_visible_maddrs()]
    others = [
        make_dht(start=True, initial_peers=maddrs, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        for _ in range(3)
    ]
    yield [first, *others]
    for d in [first, *others]:
        d.shutdown()


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    """A few kB of repetitive English: a tiny byte-level model learns it within steps."""
    rng = random.Random(0)
    words = (
        "the quick brown fox jumps over the lazy dog while a swarm of peers trains a small model"
    ).split()
    lines = [" ".join(rng.choice(words) for _ in range(12)) + "." for _ in range(300)]
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text("\n".join(lines))
    return path


# The model issue 11 found the old trainer failing on: SmolLM2's tokenizer (vocabulary 49152),
# hidden 64, 6 blocks, GQA 8/2 heads, untied head, weights from N(0, 0.2).
WIDE_VOCAB_CONFIG = {
    **TINY_CONFIG,
    "vocab_size": 49152,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
}


@pytest.fixture(scope="session")
def wide_vocab_model_dir(tmp_path_factory) -> Path:
    """A tiny Llama with SmolLM2's real tokenizer (from its GGUF), unlike the byte-level one."""
    from swarm.model.loading import load_tokenizer

    folder = write_tiny_checkpoint(
        tmp_path_factory.mktemp("models") / "wide-vocab-llama", WIDE_VOCAB_CONFIG, std=0.2
    )
    load_tokenizer("smollm2-135m").backend.save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture
def training_peers(tmp_path, throughput_cache) -> Iterator[Callable[..., PeerProcess]]:
    """Start training peers (`join --train ...` arguments); all are killed at teardown."""
    started: list[PeerProcess] = []

    def start(*args: str) -> PeerProcess:
        env = {"SWARM_MESH_CACHE": str(throughput_cache.parent)}
        log = tmp_path / f"train-peer{len(started)}.log"
        proc = PeerProcess(list(args), env=env, log_path=log)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()


@pytest.fixture
def trainers(tmp_path) -> Iterator[Callable[..., TrainerProcess]]:
    started: list[TrainerProcess] = []

    def start(*args: str) -> TrainerProcess:
        proc = TrainerProcess(list(args), tmp_path / f"trainer{len(started)}.log")
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()
