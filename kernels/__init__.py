"""Swarm Mesh's int8 quantization kernels: wire codecs and LLM.int8() weights and matmul.

Used by swarm (int8 blocks; the peer's wire layer, codec list and dtype names) and
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
from kernels.int8_matmul import (
    Int8Weight,
    int8_linear,
    int8_mm,
    quantize_rows_with_outliers,
    quantize_weight,
)
from kernels.reference import QuantizationError

__all__ = [
    "BLOCK_SIZES",
    "CODECS",
    "DTYPES",
    "DTYPE_NAMES",
    "CodecSpec",
    "Int8Weight",
    "QuantizationError",
    "QuantizedTensor",
    "dequantize",
    "int8_linear",
    "int8_mm",
    "is_valid_codec",
    "parse_codec",
    "quantize",
    "quantize_rows_with_outliers",
    "quantize_weight",
]
