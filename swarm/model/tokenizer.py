"""A thin tokenizer over `tokenizers.Tokenizer`, built from tokenizer.json or GGUF metadata.

Used by local and distributed generation, the CLIs and the benchmarks.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer

from swarm.errors import BadRequest, CheckpointError

logger = logging.getLogger(__name__)

# GGUF token types: 3 marks control tokens such as <|im_end|>; 4 user-defined ones.
_CONTROL, _USER_DEFINED = 3, 4
# `tokenizer.ggml.pre` values whose split regex differs from GPT-2's (which ByteLevel applies).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT}
# The template's default system line, written with a real newline or a Jinja "\n" escape.
_DEFAULT_SYSTEM = re.compile(r"<\|im_start\|>system(?:\\n|\n)(.*?)<\|im_end\|>", re.S)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable spelling of the 256 bytes, the alphabet of byte-level vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


class Tokenizer:
    """encode/decode text, the ids that end generation, and the ChatML chat template."""

    def __init__(
        self,
        backend: BackendTokenizer,
        eos_token_ids: list[int],
        bos_token_id: int | None = None,
        add_bos: bool = False,
        chat_template: str | None = None,
    ):
        self.backend = backend
        self.eos_token_ids = list(eos_token_ids)
        self.bos_token_id = bos_token_id
        self.add_bos = add_bos
        self.chat_template = chat_template

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special tokens written in it (e.g. `<|im_start|>`) stay whole."""
        ids = self.backend.encode(text, add_special_tokens=True).ids
        if self.add_bos and self.bos_token_id is not None and ids[:1] != [self.bos_token_id]:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """The ChatML prompt SmolLM2-Instruct (and Qwen) expect, with the template's system line."""
        if not self.chat_template or "<|im_start|>" not in self.chat_template:
            raise BadRequest("this model has no ChatML chat template; run without --chat")
        parts = []
        default = _DEFAULT_SYSTEM.search(self.chat_template)
        if default and (not messages or messages[0].get("role") != "system"):
            parts.append(f"<|im_start|>system\n{default.group(1)}<|im_end|>\n")
        for m in messages:
            parts.append(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n")
        if add_generation_prompt:
            parts.append("<|im_start|>assistant\n")
        return "".join(parts)

    def save(self, folder: str | Path) -> None:
        """Write `tokenizer.json` and `tokenizer_config.json`, which `from_hf_folder` reads back."""
        folder = Path(folder)
        self.backend.save(str(folder / "tokenizer.json"))
        config: dict[str, Any] = {
            "eos_token_id": self.eos_token_ids,
            "bos_token_id": self.bos_token_id,
            "add_bos_token": self.add_bos,
        }
        if self.chat_template:
            config["chat_template"] = self.chat_template
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))

    @classmethod
    def from_hf_folder(cls, folder: str | Path, config: dict[str, Any] | None = None) -> Tokenizer:
        """From `tokenizer.json` (+ tokenizer_config.json, generation_config.json if present)."""
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(f"tokenizer.json not found in {folder}")
        try:
            backend = BackendTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exception on bad JSON
            raise CheckpointError(f"corrupt tokenizer.json in {folder}: {e}") from e
        extra: dict[str, Any] = {}
        for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
            p = folder / name
            if p.is_file():
                try:
                    extra.update(json.loads(p.read_text(encoding="utf-8")))
                except (OSError, json.JSONDecodeError) as e:
                    raise CheckpointError(f"cannot read {p}: {e}") from e
        extra.update(config or {})
        eos = extra.get("eos_token_id")
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        template = extra.get("chat_template")
        return cls(
            backend,
            eos_ids,
            extra.get("bos_token_id"),
            # tokenizer.json's post-processor adds BOS where the model wants it; a folder we saved
            # from a GGUF file says so itself (encode never doubles a BOS).
            add_bos=bool(extra.get("add_bos_token", False)),
            chat_template=template if isinstance(template, str) else None,
        )

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any]) -> Tokenizer:
        """A byte-level BPE (`tokenizer.ggml.model == "gpt2"`) from the file's tokens and merges."""
        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise CheckpointError(
                f"unsupported GGUF tokenizer {kind!r}: only byte-level BPE (gpt2)"
            )
        tokens: list[str] = meta.get("tokenizer.ggml.tokens") or []
        merges_raw: list[str] = meta.get("tokenizer.ggml.merges") or []
        if not tokens:
            raise CheckpointError("GGUF file has no tokenizer.ggml.tokens")
        alphabet = set(_bytes_to_unicode().values())
        spell = _bytes_to_unicode()
        vocab = {}
        for i, tok in enumerate(tokens):
            # Tokens outside the byte alphabet (mislabelled specials) are respelled byte by byte.
            key = tok if set(tok) <= alphabet else "".join(spell[b] for b in tok.encode("utf-8"))
            vocab.setdefault(key, i)
        merges = [tuple(m.split(" ", 1)) for m in merges_raw]
        backend = BackendTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
        split = _SPLITS.get(meta.get("tokenizer.ggml.pre", ""))
        if split is None:
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        else:
            backend.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Split(Regex(split), behavior="isolated"),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                ]
            )
        backend.decoder = decoders.ByteLevel()
        types = meta.get("tokenizer.ggml.token_type") or []
        special = [
            AddedToken(t, normalized=False, special=True)
            for t, k in zip(tokens, types, strict=False)
            if k == _CONTROL and set(t) <= alphabet
        ]
        user = [
            AddedToken(t, normalized=False, special=False)
            for t, k in zip(tokens, types, strict=False)
            if k == _USER_DEFINED
        ]
        backend.add_special_tokens(special)
        backend.add_tokens(user)
        eos = meta.get("tokenizer.ggml.eos_token_id")
        eos_ids = [] if eos is None else [int(eos)]
        # ChatML models end a turn with <|im_end|>; plain text with <|endoftext|>.
        for extra in ("<|im_end|>", "<|endoftext|>"):
            tid = backend.token_to_id(extra)
            if tid is not None and tid not in eos_ids:
                eos_ids.append(tid)
        return cls(
            backend,
            eos_ids,
            meta.get("tokenizer.ggml.bos_token_id"),
            add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
            chat_template=meta.get("tokenizer.chat_template"),
        )


class StreamDecoder:
    """Turns generated ids into text pieces as they come, holding back split UTF-8 characters."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""  # a multi-byte character is not complete yet
        piece, self.emitted = text[self.emitted :], len(text)
        return piece

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids)
        piece, self.emitted = text[self.emitted :], len(text)
        return piece
