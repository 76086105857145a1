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


def test_tiny_model_nf4_equals_in_process_nf4(tiny):
    args = ["--local", "--model", str(tiny), "hello the tell", "--max-new-tokens", "4"]
    proc = run_cli(*args, "--quant", "nf4")
    assert proc.returncode == 0, proc.stderr
    tok, model = load_tokenizer(str(tiny)), load_model(str(tiny), quant="nf4")
    ids = generate_local(model, tok, tok.encode("hello the tell"), 4, SamplingConfig())
    assert proc.stdout == tok.decode(ids) + "\n" and "quant nf4" in proc.stderr


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


def test_a_folder_saved_from_a_gguf_model_generates_the_same(tiny, tmp_path):
    # What `swarm-train --save` writes from a GGUF source: weights, config and its tokenizer.
    from swarm.training.checkpoint import client_tensors, span_tensors, write_folder

    model, tok = load_model(str(tiny)), load_tokenizer(str(tiny))
    tensors = {**client_tensors(model.client), **span_tensors(model.span)}
    saved = write_folder(tmp_path / "saved", model.config, tensors, None, tok)
    again = load_tokenizer(str(saved))
    text = "hello the tell <|im_end|> x"
    assert again.encode(text) == tok.encode(text) and again.eos_token_ids == tok.eos_token_ids
    args = ("--local", "hello the tell", "--max-new-tokens", "6")
    proc, want = run_cli("--model", str(saved), *args), run_cli("--model", str(tiny), *args)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == want.stdout


def test_output_cut_at_the_context_says_so(tiny):
    context = load_model(str(tiny)).config.max_position_embeddings
    tok = load_tokenizer(str(tiny))
    prompt = "hello " * 8
    n = len(tok.encode(prompt))
    assert n < context
    proc = run_cli("--local", "--model", str(tiny), prompt, "--max-new-tokens", str(context))
    assert proc.returncode == 0, proc.stderr
    assert f"output cut at the model's context of {context} tokens: prompt {n}" in proc.stderr
    short = run_cli("--local", "--model", str(tiny), prompt, "--max-new-tokens", "2")
    assert "output cut" not in short.stderr


def test_a_prompt_after_initial_peers_is_the_prompt():
    from petals_like.cli import parse_args

    maddr = "/ip4/127.0.0.1/tcp/31337/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"
    args = parse_args(["--model", "smollm2-135m", "--initial-peers", maddr, maddr, "Once upon"])
    assert args.prompt == "Once upon" and args.initial_peers == [maddr, maddr]
    assert parse_args(["hi", "--initial-peers", maddr]).initial_peers == [maddr]
    with pytest.raises(SystemExit):
        parse_args(["--initial-peers", maddr])
