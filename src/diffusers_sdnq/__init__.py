"""diffusers-sdnq: load, run, fine-tune and write SDNQ-quantized models with the Hugging Face stack.

``import diffusers_sdnq`` registers the ``"sdnq"`` quantization backend in diffusers and transformers (and the
LoRA adapters in PEFT): right away for libraries already imported, at their import for the others, so the
import order never matters and this import stays cheap. Installed normally, the package's start-up hook does
the same without any import (opt out with ``DIFFUSERS_SDNQ_AUTOLOAD=0``). :class:`SDNQConfig` quantizes while
loading, in diffusers and transformers alike (the reference's name and keyword arguments). The codec in
:mod:`diffusers_sdnq.format` is pure torch and can be used on its own.
"""

from __future__ import annotations

from .format import DTYPES, LayerLayout, LayerOptions, SDNQFormatError, get_dtype
from .format.config import QuantConfig
from .integrations import register_all, setup
from .layers import SDNQLayerMixin, SDNQLinear, apply_sdnq_options_to_model, dequantize_model, enable_quantized_matmul

__version__ = "0.1.0"


def register() -> list[str]:
    """Import and set up every installed library now (import already arranges it lazily; safe to call again)."""
    return register_all()


setup()


def __getattr__(name: str):
    # SDNQConfig subclasses diffusers' config mixin: imported on first use, so ``import diffusers_sdnq`` stays cheap
    if name == "SDNQConfig":
        from .integrations.diffusers.config import SDNQConfig

        return SDNQConfig
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DTYPES",
    "LayerLayout",
    "LayerOptions",
    "QuantConfig",
    "SDNQConfig",
    "SDNQFormatError",
    "SDNQLayerMixin",
    "SDNQLinear",
    "__version__",
    "apply_sdnq_options_to_model",
    "dequantize_model",
    "enable_quantized_matmul",
    "get_dtype",
    "register",
]
