"""`swarm-generate --local` as a subprocess: output, summary, and `error:` on bad input.

Runs the CLI module with the test's interpreter from the repository root, with a timeout.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from swarm.errors import CheckpointError
from swarm.generation import SamplingConfig, generate_local
from swarm.model.loading import load_model, load_tokenizer, resolve_model

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "petals_like.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    pytest.importorskip("transformers")
    from tests.model.tiny_checkpoints import make_reference, write_gguf, write_hf

    root = tmp_path_factory.mktemp("cli")
    write_hf(make_reference(tied=True), root / "tiny-hf", sharded=False)
    return write_gguf(make_reference(tied=False, seed=1), root / "tiny.gguf")


def assert_error(proc: subprocess.CompletedProcess, pattern: str) -> None:
    assert proc.returncode != 0, proc
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("swarm-generate: error: ") and pattern in last, proc.stderr


def test_tiny_model_output_equals_in_process_generation(tiny):
    proc = run_cli("--local", "--model", str(tiny), "hello the tell", "--max-new-tokens", "6")
    assert proc.returncode == 0, proc.stderr
    tok, model = load_tokenizer(str(tiny)), load_model(str(tiny))
    ids = generate_local(model, tok, tok.encode("hello the tell"), 6, SamplingConfig())
    assert proc.stdout == tok.decode(ids) + "\n"
    assert "tokens/s" in proc.stderr and "load" in proc.stderr


def test_tiny_model_int8_and_sampling_flags(tiny):
    args = ["--local", "--model", str(tiny), "hello", "--max-new-tokens", "4", "--quant", "int8"]
    args += ["--temperature", "0.8", "--top-k", "20", "--top-p", "0.9", "--seed", "3"]
    first, second = run_cli(*args), run_cli(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout
    assert "quant int8" in first.stderr


def test_smollm2_answers():
    try:
        resolve_model("smollm2-135m")
    except CheckpointError as e:
        pytest.skip(str(e))
    proc = run_cli("--local", "The capital of France is", "--max-new-tokens", "4")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
    assert "Paris" not in proc.stderr and "tokens/s" in proc.stderr


def test_missing_model():
    assert_error(run_cli("--local", "--model", "/no/such/model", "hi"), "not found")


def test_prompt_longer_than_context(tiny):
    proc = run_cli("--local", "--model", str(tiny), "hello " * 80)
    assert_error(proc, "context")


def test_corrupt_and_unsupported_checkpoints(tiny, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(tiny.read_bytes()[:5000])
    assert_error(run_cli("--local", "--model", str(bad), "hi"), "GGUF")
    folder = tmp_path / "gpt2"
    shutil.copytree(tiny.parent / "tiny-hf", folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (folder / "config.json").write_text(json.dumps(cfg))
    assert_error(run_cli("--local", "--model", str(folder), "hi"), "unsupported architecture")


def test_bad_flags(tiny):
    assert_error(run_cli("hi"), "--local")
    assert_error(run_cli("hi", "--initial-peers", "/ip4/127.0.0.1/tcp/1"), "/p2p/PEER_ID")
    proc = run_cli("--local", "--model", str(tiny), "hi", "--top-p", "0")
    assert_error(proc, "top_p")
