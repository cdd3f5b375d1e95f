"""Model-wide switches: the quantized matmul on or off, compute dtype, float32 scales.

:func:`apply_sdnq_options_to_model` has the name and keywords of the call the SD.Next model cards print
(``apply_sdnq_options_to_model(model, use_quantized_matmul=True)``), so their snippets run unchanged with models
loaded by diffusers-sdnq. :func:`enable_quantized_matmul` is the same switch with a pattern filter and the list of
layers that cannot use it, and why.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn

from ..format.layout import companion_dtype
from ..format.patterns import PatternSet
from . import qmatmul
from .forward import set_forward_options
from .modules import SDNQLayerMixin

logger = logging.getLogger("diffusers_sdnq")


def _layers(model: nn.Module, modules: str | Iterable[str] | None) -> dict[str, SDNQLayerMixin]:
    """The quantized layers under ``model`` whose qualified name matches ``modules`` (all when None)."""
    patterns = PatternSet([modules] if isinstance(modules, str) else list(modules)) if modules is not None else None
    return {name: m for name, m in model.named_modules()
            if isinstance(m, SDNQLayerMixin) and (patterns is None or patterns.matches(name))}


def quantized_matmul_skips(model: nn.Module, modules: str | Iterable[str] | None = None) -> dict[str, str]:
    """``{layer name: reason}`` for every quantized layer under ``model`` (matching ``modules``) that cannot use
    the quantized matmul: embeddings and transposed convolutions, weights under 32 or not multiples of 16, layers
    the checkpoint's ``modules_to_not_use_matmul`` excludes, unsupported combinations."""
    skipped = {}
    for name, layer in _layers(model, modules).items():
        reason = qmatmul.skip_reason(layer, switched_on=True)
        if reason is not None:
            skipped[name] = reason
    return skipped


def enable_quantized_matmul(model: nn.Module, enabled: bool | None = True,
                            modules: str | Iterable[str] | None = None) -> dict[str, str]:
    """Switch the quantized matmul on (``True``), off (``False``) or back to what each checkpoint says (``None``)
    for the quantized layers under ``model``, or only those whose name matches ``modules`` (SDNQ's name matching:
    a name component such as ``"attn"``, a ``*`` wildcard, or a ``.prefix``).

    Returns (and logs) the layers that cannot use it, with the reason; they keep the dequantize path. Linear layers
    use it only with at least :data:`~diffusers_sdnq.layers.qmatmul.MIN_TOKENS` input rows, as the reference does.
    """
    set_forward_options(model, quantized_matmul=enabled, modules=modules)
    if not enabled:
        return {}
    skipped = quantized_matmul_skips(model, modules)
    if skipped:
        logger.info("diffusers-sdnq: quantized matmul skips %d of %d quantized layers (they dequantize instead): %s",
                    len(skipped), len(_layers(model, modules)),
                    "; ".join(f"{name}: {why}" for name, why in skipped.items()))
    return skipped


def apply_sdnq_options_to_model(model: nn.Module, dtype: torch.dtype | None = None,
                                dequantize_fp32: bool | None = None,
                                use_quantized_matmul: bool | None = None) -> nn.Module:
    """Change how a loaded SDNQ model computes, as the reference's function of the same name does.

    * ``use_quantized_matmul``: switch the quantized matmul on or off for every layer that allows it (see
      :func:`enable_quantized_matmul`; skipped layers are logged at INFO level).
    * ``dtype``: cast the model (its dense parameters and the quantized layers' compute dtype; stored codes and
      float32 scales keep their dtypes).
    * ``dequantize_fp32``: keep scales and zero points in float32 (True) or in the compute dtype where the format
      allows it (False: bfloat16 / float16 models, types whose range fits; halves their memory, rounds them).

    Returns ``model`` (modified in place)."""
    if dtype is not None:
        nn.Module.to(model, dtype)  # diffusers' ModelMixin.to refuses dtype casts of quantized models
        for layer in _layers(model, None).values():
            layer.compute_dtype = dtype
    if dequantize_fp32 is not None:
        for layer in _layers(model, None).values():
            _set_companion_dtype(layer, dequantize_fp32)
    if use_quantized_matmul is not None:
        enable_quantized_matmul(model, use_quantized_matmul)
    return model


def _set_companion_dtype(layer: SDNQLayerMixin, fp32: bool) -> None:
    layout = layer.sdnq_layout
    target = companion_dtype(layout.dtype, fp32, layer.compute_dtype)
    for name in ("scale", "zero_point"):
        param = layer._parameters.get(name)
        if param is not None and param.is_floating_point() and param.dtype != target:
            layer._parameters[name] = nn.Parameter(param.detach().to(target), requires_grad=False)
    layer.__dict__.pop("_sdnq_dense_cache", None)
    layer.__dict__.pop("_sdnq_qmm_cache", None)
