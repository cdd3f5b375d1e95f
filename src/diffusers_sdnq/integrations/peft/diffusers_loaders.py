"""Dense shapes for diffusers' Flux LoRA loader.

``FluxLoraLoaderMixin.load_lora_weights`` compares each LoRA's ``lora_A`` width with the base layer's weight
shape to decide whether a layer must be widened (Flux Control LoRAs widen ``x_embedder``). It reads
``weight.shape`` except for bitsandbytes/GGUF, which it recognises by class name. For an SDNQ layer that is the
*packed* shape, so without this shim the loader either fails to unpack it or "widens" the layer by copying the
packed bytes into a float matrix. Two diffusers helpers are wrapped (idempotently, only SDNQ layers take the
new path): the shape query returns the dense shape, and the widening dequantizes, as diffusers does for
bitsandbytes and GGUF (the widened layer is a plain ``nn.Linear``).

``diffusers.loaders.lora_pipeline`` imports PEFT half-way through its own import, so the PEFT hook cannot patch
it then. :func:`ensure_diffusers_lora_shims` is therefore also called when diffusers finishes loading an SDNQ
model (always before a LoRA can be loaded onto it) and whenever PEFT builds an adapter layer.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import sys

from torch import nn

from ...layers import SDNQLayerMixin

logger = logging.getLogger("diffusers_sdnq")
_MARK = "_diffusers_sdnq_original"
_MODULE = "diffusers.loaders.lora_pipeline"
_state = {"installed": False}


def ensure_diffusers_lora_shims(import_if_missing: bool = True) -> bool:
    """Install the shims once ``diffusers.loaders.lora_pipeline`` is fully imported; True when in place.

    ``import_if_missing`` imports it first (only when PEFT is installed, as LoRA loading needs it anyway). A
    module still being imported is left alone (False): the next call installs them.
    """
    if _state["installed"]:
        return True
    if import_if_missing and importlib.util.find_spec("peft") is not None:
        from .dispatch import install  # normally done by the import hook already; idempotent

        install()
        if _state["installed"]:
            return True
    module = sys.modules.get(_MODULE)
    if module is None:
        if not import_if_missing or importlib.util.find_spec("peft") is None:
            return False
        try:
            module = importlib.import_module(_MODULE)
        except ImportError:  # pragma: no cover - diffusers without the LoRA loaders
            return False
    elif getattr(getattr(module, "__spec__", None), "_initializing", False):
        return False
    _state["installed"] = install_diffusers_lora_shims(module)
    return _state["installed"]


def _module_for(model: nn.Module, base_module: nn.Module | None, param_name: str | None) -> nn.Module | None:
    if base_module is not None:
        return base_module
    if param_name and param_name.endswith(".weight"):
        try:
            return model.get_submodule(param_name.rsplit(".weight", 1)[0])
        except AttributeError:
            return None
    return None


def install_diffusers_lora_shims(lora_pipeline) -> bool:
    """Wrap the Flux loader's shape query and dequantize helper in ``lora_pipeline``; True when in place."""
    from ..upstream import resolve

    mixin = lora_pipeline.FluxLoraLoaderMixin
    current = resolve("diffusers.loaders.lora_pipeline:FluxLoraLoaderMixin._calculate_module_shape")
    helper = resolve("diffusers.loaders.lora_pipeline:_maybe_dequantize_weight_for_expanded_lora")

    shape_fn = current.__func__
    if not hasattr(shape_fn, _MARK):
        @functools.wraps(shape_fn)
        def _calculate_module_shape(model, base_module=None, base_weight_param_name=None):
            module = _module_for(model, base_module, base_weight_param_name)
            if isinstance(module, SDNQLayerMixin):
                return module.dense_weight_shape
            return shape_fn(model, base_module=base_module, base_weight_param_name=base_weight_param_name)

        setattr(_calculate_module_shape, _MARK, shape_fn)
        mixin._calculate_module_shape = staticmethod(_calculate_module_shape)

    if not hasattr(helper, _MARK):
        @functools.wraps(helper)
        def _maybe_dequantize_weight_for_expanded_lora(model, module):
            if isinstance(module, SDNQLayerMixin):
                return module.dequantize_weight()
            return helper(model, module)

        setattr(_maybe_dequantize_weight_for_expanded_lora, _MARK, helper)
        lora_pipeline._maybe_dequantize_weight_for_expanded_lora = _maybe_dequantize_weight_for_expanded_lora
    return True
