"""Tiny checkpoints written on the fly: HF safetensors folders (single and sharded) and GGUF files.

Used by loader, int8, generation and CLI tests; the GGUF is written as llama.cpp's converter does.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from swarm.model.tokenizer import _bytes_to_unicode

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

NUM_LAYERS = 4
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "l l", "e ll"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are tiny.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}"
)


def byte_alphabet() -> list[str]:
    """GPT-2's printable spelling of the 256 bytes, in the order a byte-level vocabulary has."""
    return list(_bytes_to_unicode().values())


def vocab_tokens() -> list[str]:
    return SPECIALS + byte_alphabet() + ["".join(m.split(" ")) for m in MERGES]


def make_reference(tied: bool, seed: int = 0, kv_heads: int = 2):
    """A random transformers LlamaForCausalLM whose vocabulary is our tiny byte-level BPE."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=len(vocab_tokens()),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
    )
    ref = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return ref


def write_hf_tokenizer(folder: Path) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(vocab_tokens())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in MERGES]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))


def write_hf(ref, folder: Path, sharded: bool) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    ref.save_pretrained(folder, max_shard_size="40KB" if sharded else "1GB")
    write_hf_tokenizer(folder)
    has_index = (folder / "model.safetensors.index.json").is_file()
    assert has_index == sharded, list(folder.iterdir())
    return folder


def hf_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute, verbatim."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


GGUF_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def write_gguf(ref, path: Path, f16_names: tuple[str, ...] = ()) -> Path:
    """The tiny model as a GGUF file: llama.cpp names, permuted q/k, tokenizer and template."""
    cfg = ref.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(vocab_tokens())
    w.add_token_types([3] * len(SPECIALS) + [1] * (len(vocab_tokens()) - len(SPECIALS)))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    state = {k: v.detach().float().numpy() for k, v in ref.state_dict().items()}
    tensors = {
        "token_embd.weight": state["model.embed_tokens.weight"],
        "output_norm.weight": state["model.norm.weight"],
    }
    if not cfg.tie_word_embeddings:
        tensors["output.weight"] = state["lm_head.weight"]
    for i in range(cfg.num_hidden_layers):
        for ours, theirs in GGUF_NAMES.items():
            t = state[f"model.layers.{i}.{ours}"]
            if ours.startswith("self_attn.q_proj"):
                t = hf_permute(t, cfg.num_attention_heads)
            elif ours.startswith("self_attn.k_proj"):
                t = hf_permute(t, cfg.num_key_value_heads)
            tensors[f"blk.{i}.{theirs}"] = t
    for name, t in tensors.items():
        t = np.ascontiguousarray(t)
        w.add_tensor(name, t.astype(np.float16) if name in f16_names else t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
