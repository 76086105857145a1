"""The weight quantization modes of served blocks (`--quant`), and what each costs in memory.

Used by PeerConfig and the peer's memory estimate, the loaders, swarm-generate and benchmarks.
"""

from __future__ import annotations

# none: the checkpoint's dtype; int8: row-wise absmax (LLM.int8() / weight-only matmuls);
# nf4, fp4, int4: 4-bit codes in blocks of 64 with double-quantized absmax (QLoRA).
QUANT_MODES = ("none", "int8", "nf4", "fp4", "int4")
FOURBIT_MODES = ("nf4", "fp4", "int4")
DEFAULT_PEER_QUANT = "int8"

# Weight bytes per parameter, scales included (4-bit: 0.5 + 1/64 + 4/(64 * 256)).
_BYTES_PER_PARAM = {"int8": 1.0, "nf4": 0.516, "fp4": 0.516, "int4": 0.516}


def bytes_per_param(quant: str, dtype_bytes: int) -> float:
    """Bytes a block weight takes per parameter under `quant` (`dtype_bytes` for "none")."""
    if quant not in QUANT_MODES:
        raise ValueError(f"unknown quantization {quant!r}; choose one of {', '.join(QUANT_MODES)}")
    return _BYTES_PER_PARAM.get(quant, float(dtype_bytes))
