"""A GGUF file read lazily: metadata and tensor table at open, tensor bytes only when asked for.

Used by `swarm.model.loading` for config, tokenizer and block-wise weights of GGUF models.
"""

from __future__ import annotations

import logging
import mmap
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from swarm.errors import CheckpointError

logger = logging.getLogger(__name__)

_MAGIC = b"GGUF"
# GGUF value types -> struct format of one scalar; 8 is a string, 9 an array.
_SCALARS = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_NP = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32}
_NP.update({6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64})

# Our parameter suffixes (HF names inside a block) -> llama.cpp's tensor names.
BLOCK_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
CLIENT_TENSORS = {
    "embed_tokens.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (interleaved RoPE pairs back to HF's halves)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (used to write test files)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


class GGUFFile:
    """Parsed header of a GGUF file; `tensor(name)` reads and dequantizes one tensor."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"GGUF file not found: {self.path}")
        try:
            with open(self.path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot open GGUF file {self.path}: {e}") from e
        try:
            self._parse()
        except (struct.error, UnicodeDecodeError, IndexError, ValueError, KeyError) as e:
            raise CheckpointError(f"corrupt GGUF file {self.path}: {e}") from e

    def _parse(self) -> None:
        mm = self._mm
        if mm[:4] != _MAGIC:
            raise CheckpointError(f"{self.path} is not a GGUF file (bad magic {bytes(mm[:4])!r})")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", mm, 4)
        if version < 2:
            raise CheckpointError(f"GGUF version {version} is too old (need 2 or later)")
        self._pos = 24
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            (vtype,) = self._unpack("<I")
            self.metadata[key] = self._value(vtype)
        # name -> (torch shape, GGML type, byte offset relative to the data section)
        self.tensors: dict[str, tuple[tuple[int, ...], GGMLQuantizationType, int]] = {}
        for _ in range(n_tensors):
            name = self._string()
            (n_dims,) = self._unpack("<I")
            dims = struct.unpack_from(f"<{n_dims}Q", mm, self._pos)
            self._pos += 8 * n_dims
            qtype, offset = self._unpack("<IQ")
            # GGUF lists dims fastest-first; torch wants them the other way round.
            self.tensors[name] = (tuple(reversed(dims)), GGMLQuantizationType(qtype), offset)
        align = int(self.metadata.get("general.alignment", 32))
        self._data_start = (self._pos + align - 1) // align * align
        for name in self.tensors:
            start, nbytes = self._extent(name)
            if start + nbytes > len(mm):
                raise CheckpointError(f"GGUF file {self.path} is truncated (tensor {name})")

    def _unpack(self, fmt: str) -> tuple:
        values = struct.unpack_from(fmt, self._mm, self._pos)
        self._pos += struct.calcsize(fmt)
        return values

    def _string(self) -> str:
        (n,) = self._unpack("<Q")
        s = self._mm[self._pos : self._pos + n].decode("utf-8")
        self._pos += n
        return s

    def _value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self._unpack("<" + _SCALARS[vtype])[0]
        if vtype == 8:
            return self._string()
        if vtype == 9:
            etype, count = self._unpack("<IQ")
            if etype in _NP:
                arr = np.frombuffer(self._mm, dtype=_NP[etype], count=count, offset=self._pos)
                self._pos += arr.nbytes
                return arr.tolist()
            return [self._value(etype) for _ in range(count)]
        raise ValueError(f"unknown GGUF value type {vtype}")

    def _extent(self, name: str) -> tuple[int, int]:
        shape, qtype, offset = self.tensors[name]
        block, type_size = GGML_QUANT_SIZES[qtype]
        numel = int(np.prod(shape)) if shape else 1
        return self._data_start + offset, numel // block * type_size

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "unknown"))

    def tensor(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Read one tensor's bytes (only those), dequantize them and return [torch shape]."""
        if name not in self.tensors:
            raise CheckpointError(f"GGUF file {self.path.name} has no tensor {name!r}")
        shape, qtype, _ = self.tensors[name]
        start, nbytes = self._extent(name)
        raw = np.frombuffer(self._mm, dtype=np.uint8, count=nbytes, offset=start)
        try:
            if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
                values = dequantize(raw, qtype)
            else:
                # Quantized rows: the last dim is stored as blocks of bytes.
                block, type_size = GGML_QUANT_SIZES[qtype]
                rows = raw.reshape(*shape[:-1], shape[-1] // block * type_size)
                values = dequantize(rows, qtype)
        except NotImplementedError as e:
            raise CheckpointError(f"tensor {name}: GGML type {qtype.name} is not supported") from e
        # F32 comes back as a view of the read-only map; copy it so torch owns writable memory.
        values = values if values.flags.writeable else values.copy()
        return torch.from_numpy(values.reshape(shape)).to(dtype)

    def close(self) -> None:
        self._mm.close()

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
