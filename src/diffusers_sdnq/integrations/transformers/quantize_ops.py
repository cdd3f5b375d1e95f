"""Quantize-on-load for transformers 5.x: ``from_pretrained(dense, quantization_config=SDNQTransformersConfig(...))``.

transformers builds the model on the meta device, asks :meth:`SDNQHfQuantizer.param_needs_quantization` for each
checkpoint tensor, and hands every tensor that needs it to the :class:`SDNQQuantize` conversion op right after
reading it. The op turns the dense ``weight`` of one layer into that layer's stored tensors and returns them
under their full names; the loader then puts them into the (meta) SDNQ layer. Nothing else is held: peak memory
is the quantized model plus the dense layer being converted.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...layers import SDNQLayerMixin
from ..upstream import resolve

ConversionOps = resolve("transformers.core_model_loading:ConversionOps")


def prepare_on_the_fly(quantizer: Any, model: nn.Module, dtype: Any) -> None:
    """Plan ``model`` (meta) with the writer's rules, swap in empty SDNQ layers, start a quantize session."""
    from ...quantize import QuantizeSession, prepare_model_for_quantization, writer_config

    config = writer_config(quantizer.quantization_config.to_dict())
    torch_dtype = dtype if isinstance(dtype, torch.dtype) else _model_dtype(model)
    plans = prepare_model_for_quantization(model, config, (), torch_dtype)
    quantizer.sdnq_session = QuantizeSession(config, plans, torch_dtype, model_name=type(model).__name__)
    store_config(quantizer.quantization_config, config)


def _model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the (meta) model was built in: its floating-point parameters' most common dtype."""
    counts: dict[torch.dtype, int] = {}
    for param in model.parameters():
        if param.is_floating_point():
            counts[param.dtype] = counts.get(param.dtype, 0) + param.numel()
    return max(counts, key=counts.get) if counts else torch.float32


def store_config(target: Any, config: Any) -> None:
    """Make a :class:`SDNQTransformersConfig` hold the writer's full final config (what ``config.json`` gets)."""
    target.__dict__.clear()
    target.__dict__.update(config.to_dict())


def needs_quantization(quantizer: Any, model: nn.Module, param_name: str) -> bool:
    """True for the dense ``weight`` of a layer the session still has to quantize."""
    session = getattr(quantizer, "sdnq_session", None)
    if quantizer.pre_quantized or session is None:
        return False
    module_name, _, tensor_name = param_name.rpartition(".")
    return tensor_name == "weight" and module_name in session.plans and module_name not in session.done


class SDNQQuantize(ConversionOps):
    """Dense ``<layer>.weight`` → ``<layer>.weight`` (codes), ``.scale``, ``.zero_point``, ``.svd_up`` ...

    When dynamic quantization finds no type good enough the layer is put back as its dense torch class and
    the dense weight is returned for it instead.
    """

    def __init__(self, hf_quantizer: Any) -> None:
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict: dict[str, Any], full_layer_name: str | None = None, model: nn.Module | None = None,
                missing_keys: set[str] | None = None, **kwargs: Any) -> dict[str, torch.Tensor]:
        from ...quantize import quantize_on_meta

        session = self.hf_quantizer.sdnq_session
        key = full_layer_name or next(iter(input_dict))
        value = input_dict[key]
        value = value[0] if isinstance(value, list) else value
        module_name = key.rpartition(".")[0]
        layer = model.get_submodule(module_name)
        if not isinstance(layer, SDNQLayerMixin):
            return {key: value}
        stale = [f"{module_name}.{k}" for k in layer._parameters if k != "bias"]
        out = quantize_on_meta(model, module_name, value, session)
        if missing_keys is not None:  # placeholders of the planned layout that the final one does not store
            missing_keys.difference_update(k for k in stale if k not in out)
        if not isinstance(model.get_submodule(module_name), SDNQLayerMixin):  # dynamic quantization: stays dense
            return {k: nn.Parameter(v, requires_grad=False) for k, v in out.items()}
        for param in model.get_submodule(module_name).sdnq_tensors().values():
            param._is_hf_initialized = True  # a disk-offloaded layer keeps these (see quantizer.py)
        stash = self.hf_quantizer.sdnq_offload
        if stash.on_disk(module_name):
            # transformers keeps the offload index entry of the dense checkpoint tensor for a renamed-only key, so
            # the packed weight is written into the offload folder after dispatch (integrations/offload.py)
            stash.keep(f"{module_name}.weight", out[f"{module_name}.weight"])
        return {k: nn.Parameter(v, requires_grad=False) for k, v in out.items()}
