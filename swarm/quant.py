"""The weight quantization modes of served blocks (`--quant`), and what each costs in memory.

Used by PeerConfig and the peer's memory estimate, the loaders, swarm-generate and benchmarks.
"""

from __future__ import annotations

# none: the checkpoint's dtype; int8: row-wise absmax (LLM.int8() / weight-only matmuls);
# nf4, fp4, int4: 4-bit codes in blocks of 64 with double-quantized absmax (QLoRA), calibrated
# by GPTQ where the checkpoint is loaded (k/v and one down_proj int8, 0.5% columns fp16);
# nf4-rtn, fp4-rtn, int4-rtn: the same format rounded to nearest (no calibration, no int8).
FOURBIT_MODES = ("nf4", "fp4", "int4")
RTN_MODES = tuple(f"{k}-rtn" for k in FOURBIT_MODES)
QUANT_MODES = ("none", "int8", *FOURBIT_MODES, *RTN_MODES)
DEFAULT_PEER_QUANT = "int8"

# Weight bytes per parameter, scales included (4-bit: 0.5 + 1/64 + 4/(64 * 256); calibrated:
# + 0.03 for int8 k/v, + 0.004 for one int8 down_proj, + 0.01 for kept columns, on SmolLM2).
_BYTES_PER_PARAM = {"int8": 1.0, **dict.fromkeys(FOURBIT_MODES, 0.559)}
_BYTES_PER_PARAM.update(dict.fromkeys(RTN_MODES, 0.516))


def bytes_per_param(quant: str, dtype_bytes: int) -> float:
    """Bytes a block weight takes per parameter under `quant` (`dtype_bytes` for "none")."""
    if quant not in QUANT_MODES:
        raise ValueError(f"unknown quantization {quant!r}; choose one of {', '.join(QUANT_MODES)}")
    return _BYTES_PER_PARAM.get(quant, float(dtype_bytes))
