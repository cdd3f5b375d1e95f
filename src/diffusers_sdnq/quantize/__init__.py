"""The SDNQ writer: dense weights → SDNQ checkpoints the reference (sdnq 0.2.8) and this package both load.

* :func:`quantize_weight` — one dense weight into the stored tensors of a :class:`~diffusers_sdnq.format.LayerLayout`
  (every width, float and custom-float type, group sizes, SVD, Hadamard, codebooks, double-quantized scales,
  the transposed quantized-matmul layout).
* :func:`plan_quantization` / :class:`QuantizeSession` — which layers of a model are quantized (the reference's
  default skip lists and size limits) and the per-layer work, including dynamic quantization.
* :func:`quantize_model` — quantize a model already in memory; ``from_pretrained(...,
  quantization_config=SDNQConfig(...))`` quantizes while loading.
* :func:`save_pretrained` — atomic save with ``quantization_config.json`` beside ``config.json``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..format.config import QuantConfig
from ..format.errors import SDNQShapeError
from ..format.layout import LayerLayout
from ..layers import SDNQLayerMixin, assign_stored_tensor, replace_with_sdnq_layers
from .dynamic import candidate_order, candidates, default_threshold, relative_variance_error
from .model import (
    WRITER_SDNQ_VERSION,
    QuantizeSession,
    attach_config,
    plan_quantization,
    quantize_model,
    register_config_attacher,
    restore_dense,
    set_stored_tensors,
    writer_config,
)
from .save import install_atomic_save, save_pretrained
from .skip import GENERIC_SKIP_KEYS, MODEL_SKIP_KEYS, default_skip_keys
from .weight import quantize_weight, relative_error


def check_can_quantize(config: QuantConfig) -> None:
    """Fail before any weight is read when ``config`` cannot be written (every layout option can be)."""
    writer_config(config)


def prepare_model_for_quantization(model: nn.Module, config: QuantConfig, keep_dense: Iterable[str] = (),
                                   torch_dtype: torch.dtype | None = None) -> dict[str, LayerLayout]:
    """Swap the layers ``config`` quantizes for empty quantized layers (meta device); returns their layouts.

    Until its dense weight arrives each new layer advertises the dense ``weight`` shape, so loaders accept the
    dense checkpoint. Skipped layers are appended to ``config.modules_to_not_convert`` (see
    :func:`plan_quantization`).
    """
    plans = plan_quantization(model, config, keep_dense)
    dtype = torch_dtype or torch.float32
    replace_with_sdnq_layers(model, plans, dtype, companion_dtype=torch.float32)
    for name, layout in plans.items():
        layer = model.get_submodule(name)
        layer._parameters["weight"] = nn.Parameter(
            torch.empty(layout.weight_shape, dtype=dtype, device="meta"), requires_grad=False)
    return plans


def quantize_into(module: SDNQLayerMixin, name: str, value: torch.Tensor, device=None, *,
                  session: QuantizeSession | None = None, module_name: str | None = None) -> bool:
    """Loader hook: a dense ``weight`` becomes the layer's stored tensors; ``bias`` is copied.

    With a ``session`` (and the layer's ``module_name``) the session's options apply, dynamic quantization
    and its ``quantization_device`` / ``return_device`` included. Returns False when dynamic quantization keeps the layer dense (the caller restores a dense layer).
    """
    if session is not None:
        device = session.result_device(device if device is not None else value.device)
    if name != "weight":
        assign_stored_tensor(module, name, value, device)
        return True
    layout = module.sdnq_layout
    if tuple(value.shape) != layout.weight_shape:
        raise SDNQShapeError(f"dense weight{f' of {module_name!r}' if module_name else ''} has shape "
                             f"{list(value.shape)}, expected {list(layout.weight_shape)}")
    if session is not None and module_name is not None:
        result = session.quantize(module_name, value)
        if result is None:
            return False
        layout, tensors = result
    else:
        tensors = quantize_weight(value, layout, dtype=getattr(module, "compute_dtype", None))
    set_stored_tensors(module, layout, tensors, device)
    return True


def quantize_on_meta(model: nn.Module, name: str, dense: torch.Tensor,
                     session: QuantizeSession) -> dict[str, torch.Tensor]:
    """Quantize the dense weight of planned layer ``name`` for a loader that assigns the results itself.

    The (meta) layer is re-declared with the stored tensors' final shapes and dtypes, so the loader accepts them;
    returns them by full name. When dynamic quantization keeps the layer dense it becomes its torch class again
    (on meta) and the dense weight, in the session's dtype, is returned for it instead."""
    result = session.quantize(name, dense)
    if result is None:
        restore_dense(model, name, torch.empty(dense.shape, dtype=session.torch_dtype, device="meta"))
        return {f"{name}.weight": dense.to(session.torch_dtype)}
    layout, tensors = result
    set_stored_tensors(model.get_submodule(name), layout,
                       {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in tensors.items()})
    return {f"{name}.{k}": v for k, v in tensors.items()}


__all__ = [
    "GENERIC_SKIP_KEYS",
    "MODEL_SKIP_KEYS",
    "WRITER_SDNQ_VERSION",
    "QuantizeSession",
    "attach_config",
    "candidate_order",
    "candidates",
    "check_can_quantize",
    "default_skip_keys",
    "default_threshold",
    "install_atomic_save",
    "plan_quantization",
    "prepare_model_for_quantization",
    "quantize_into",
    "quantize_model",
    "quantize_on_meta",
    "register_config_attacher",
    "quantize_weight",
    "relative_error",
    "relative_variance_error",
    "restore_dense",
    "save_pretrained",
    "set_stored_tensors",
    "writer_config",
]
