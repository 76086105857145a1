"""Swarm Mesh's int8 quantization kernels: wire codecs, LLM.int8() weights and matmul, wire format.

Used by swarm (stages, RPCs) and petals_like (client); the only door into kernels/. (Not Hugging
Face's `kernels` package: it defines none of that package's names and no __version__.)
"""

from kernels.codecs import (
    BLOCK_SIZES,
    CODECS,
    QuantizedTensor,
    dequantize,
    is_valid_codec,
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
from kernels.wire import (
    MAX_ELEMENTS,
    WireFormatError,
    decode_bytes,
    deserialize,
    encode_bytes,
    from_proto,
    serialize,
    to_proto,
)

__all__ = [
    "BLOCK_SIZES",
    "CODECS",
    "MAX_ELEMENTS",
    "Int8Weight",
    "QuantizationError",
    "QuantizedTensor",
    "WireFormatError",
    "decode_bytes",
    "dequantize",
    "deserialize",
    "encode_bytes",
    "from_proto",
    "int8_linear",
    "int8_mm",
    "is_valid_codec",
    "quantize",
    "quantize_rows_with_outliers",
    "quantize_weight",
    "serialize",
    "to_proto",
]
