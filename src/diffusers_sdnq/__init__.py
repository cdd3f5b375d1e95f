"""diffusers-sdnq: load, run, fine-tune and write SDNQ-quantized models with the Hugging Face stack.

``import diffusers_sdnq`` registers the ``"sdnq"`` quantization backend in diffusers and transformers, so
``from_pretrained`` loads SDNQ checkpoints with this package's layers. The codec in
:mod:`diffusers_sdnq.format` is pure torch and can be used on its own.
"""

from __future__ import annotations

from .format import DTYPES, LayerLayout, LayerOptions, SDNQFormatError, get_dtype
from .format.config import QuantConfig
from .integrations import register_all
from .layers import SDNQLayerMixin, SDNQLinear, dequantize_model

__version__ = "0.1.0"


def register() -> list[str]:
    """Register the SDNQ backend into diffusers and transformers (done on import; safe to call again)."""
    return register_all()


register()

__all__ = [
    "DTYPES",
    "LayerLayout",
    "LayerOptions",
    "QuantConfig",
    "SDNQFormatError",
    "SDNQLayerMixin",
    "SDNQLinear",
    "__version__",
    "dequantize_model",
    "get_dtype",
    "register",
]
