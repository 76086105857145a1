"""Swarm Mesh's quantization kernels: wire codecs, int8 and 4-bit weights (and GPTQ), matmuls.

Used by swarm (int8 and 4-bit blocks; the peer's wire layer, codec list and dtype names) and
simulations/bench_kernels.py; the only door into kernels/. (Not Hugging Face's `kernels`
package: it defines none of that package's names and no __version__.)
"""

from kernels.codecs import (
    BLOCK_SIZES,
    CODECS,
    DTYPE_NAMES,
    DTYPES,
    CodecSpec,
    QuantizedTensor,
    dequantize,
    is_valid_codec,
    parse_codec,
    quantize,
)
from kernels.fourbit import ABSMAX_BLOCK as FOURBIT_ABSMAX_BLOCK
from kernels.fourbit import BLOCK as FOURBIT_BLOCK
from kernels.fourbit import KINDS as FOURBIT_KINDS
from kernels.fourbit import FourBitWeight, fourbit_linear, quantize_4bit
from kernels.gptq import add_to_hessian, gptq_quantize_4bit
from kernels.int8_matmul import (
    Int8Weight,
    choose_path,
    int8_linear,
    int8_mm,
    pack_scales,
    quantize_rows_with_outliers,
    quantize_weight,
    weight_only_max_tokens,
)
from kernels.reference import QuantizationError

__all__ = [
    "BLOCK_SIZES",
    "CODECS",
    "DTYPES",
    "DTYPE_NAMES",
    "FOURBIT_ABSMAX_BLOCK",
    "FOURBIT_BLOCK",
    "FOURBIT_KINDS",
    "CodecSpec",
    "FourBitWeight",
    "Int8Weight",
    "QuantizationError",
    "QuantizedTensor",
    "add_to_hessian",
    "choose_path",
    "dequantize",
    "fourbit_linear",
    "gptq_quantize_4bit",
    "int8_linear",
    "int8_mm",
    "pack_scales",
    "is_valid_codec",
    "parse_codec",
    "quantize",
    "quantize_4bit",
    "quantize_rows_with_outliers",
    "quantize_weight",
    "weight_only_max_tokens",
]
