"""QLoRA-style preparation of an SDNQ model: PEFT's kbit recipe, with the stored tensors left exactly as loaded.

``peft.prepare_model_for_kbit_training`` freezes the model and upcasts every fp16/bf16 parameter to float32,
sparing only bitsandbytes' ``Params4bit`` (recognised by class name). On an SDNQ model loaded in bf16 that also
upcasts the layers' float companions (SVD factors; scales when ``dequantize_fp32`` is off). That is lossless but
changes the dtypes the format stores and the last bits of the dequantized weight. It also enables gradient
checkpointing only for the backends it knows. :func:`prepare_model_for_sdnq_training` runs PEFT's recipe and
then puts the original stored tensors back, and enables gradient checkpointing when asked.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...layers import SDNQLayerMixin


def sdnq_stored_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every stored tensor of every SDNQ layer, keyed ``<layer>.<name>`` (PEFT wrappers' ``base_layer`` dropped)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, SDNQLayerMixin):
            clean = name.replace(".base_layer", "")
            for key, value in module.sdnq_tensors().items():
                out[f"{clean}.{key}"] = value
    return out


def prepare_model_for_sdnq_training(model: nn.Module, use_gradient_checkpointing: bool = True,
                                    gradient_checkpointing_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Freeze the model and upcast its half-precision dense parameters as PEFT does for k-bit models.

    SDNQ stored tensors (packed codes, scales, zero points, SVD factors) keep their exact bytes and dtypes.
    With ``use_gradient_checkpointing`` (and a model that supports it) gradient checkpointing is enabled; for
    transformers models with ``use_reentrant=False`` unless given, so the frozen embeddings need no gradient hook.
    """
    from peft import prepare_model_for_kbit_training

    kept = {id(p): (p, p.data) for m in model.modules() if isinstance(m, SDNQLayerMixin)
            for p in m.sdnq_tensors().values()}
    prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    for param, data in kept.values():
        param.data = data
    if not use_gradient_checkpointing:
        return model
    if getattr(model, "supports_gradient_checkpointing", False):  # transformers
        kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if kwargs["use_reentrant"] and hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    elif getattr(model, "_supports_gradient_checkpointing", False):  # diffusers
        model.enable_gradient_checkpointing()
    return model
