"""Pure-torch SDNQ codec: dtype table, bit packing, layout planning, dequantization.

No Hugging Face imports here, so converters and other tools can build on this package alone.
"""

from .codec import decode_codes, dequantize
from .dtypes import ALIASES, DTYPES, QDType, all_dtype_names, canonical_name, get_dtype
from .errors import SDNQConfigError, SDNQDtypeError, SDNQFormatError, SDNQShapeError
from .hadamard import hadamard_matrix
from .layout import (
    LayerLayout,
    LayerOptions,
    StoredFacts,
    TensorSpec,
    check_stored,
    infer_stored,
    layer_kind_of,
    plan_layer,
)
from .packing import LAYOUTS, pack, packed_shape, unpack

__all__ = [
    "ALIASES",
    "DTYPES",
    "LAYOUTS",
    "LayerLayout",
    "LayerOptions",
    "QDType",
    "SDNQConfigError",
    "SDNQDtypeError",
    "SDNQFormatError",
    "SDNQShapeError",
    "StoredFacts",
    "TensorSpec",
    "all_dtype_names",
    "canonical_name",
    "check_stored",
    "decode_codes",
    "dequantize",
    "get_dtype",
    "infer_stored",
    "hadamard_matrix",
    "layer_kind_of",
    "pack",
    "packed_shape",
    "plan_layer",
    "unpack",
]
