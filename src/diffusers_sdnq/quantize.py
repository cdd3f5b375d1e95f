"""A first writer: round-to-nearest quantization of dense weights into SDNQ's stored layout.

This covers integer widths (packed or int8/uint8) with per-group scales and zero points, which is what
quantize-on-load (``from_pretrained(..., quantization_config=SDNQDiffusersConfig(...))``) needs today. SVD,
Hadamard, codebooks, custom floats and transposed storage are written by the full writer (a later issue);
asking for them raises ``NotImplementedError`` instead of writing something the reference would misread.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from .format import pack
from .format.codec import reduction_axis
from .format.config import QuantConfig
from .format.layout import LayerLayout, plan_layer
from .layers import SDNQLayerMixin, assign_stored_tensor, replace_with_sdnq_layers, sdnq_class_for
from .layers.replace import layer_kind_of

_UNSUPPORTED = ("use_svd", "use_hadamard", "use_codebook", "use_quantized_matmul", "use_quantized_matmul_conv",
                "use_dynamic_quantization", "scale_dtype", "zero_point_dtype")


def check_can_quantize(config: QuantConfig) -> None:
    """Refuse options the first writer cannot produce yet, before any weight is read."""
    asked = [name for name in _UNSUPPORTED if getattr(config, name)]
    dt = config.weights_dtype
    from .format import get_dtype

    if not get_dtype(dt).is_integer:
        asked.append(f"weights_dtype={dt!r} (float types)")
    if asked:
        raise NotImplementedError(
            "diffusers-sdnq cannot write these SDNQ options yet: " + ", ".join(asked)
            + ". Quantize with an integer weights_dtype and default options, or load a checkpoint made by sdnq."
        )


def quantize_weight(weight: torch.Tensor, layout: LayerLayout) -> dict[str, torch.Tensor]:
    """Round-to-nearest quantization of ``weight`` into the tensors ``layout`` stores (float32 scales)."""
    if layout.svd_rank or layout.hadamard_size or layout.codebook or layout.transposed or layout.scale_qdtype:
        raise NotImplementedError(f"writing {layout} is not supported by the round-to-nearest writer")
    dt = layout.dtype
    w = weight.detach().to(torch.float32).reshape(layout.quantized_shape)
    axis = reduction_axis(layout)
    out: dict[str, torch.Tensor] = {}
    if dt.needs_zero_point:
        lo = w.amin(dim=axis, keepdim=True)
        hi = w.amax(dim=axis, keepdim=True)
        scale = (hi - lo) / (dt.qmax - dt.qmin)
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        q = torch.round((w - lo) / scale).clamp(0, min(dt.qmax, 2**dt.bits - 1))
        codes = q
        out["zero_point"] = lo.reshape(layout.scale_shape).contiguous()
    else:
        scale = w.abs().amax(dim=axis, keepdim=True) / dt.qmax
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        q = torch.round(w / scale).clamp(dt.qmin, dt.qmax)
        codes = q - dt.qmin
    if dt.kind == "native":
        out["weight"] = q.to(dt.torch_dtype).contiguous()
    else:
        out["weight"] = pack(codes.to(torch.int32).reshape(-1), dt.bits)
    out["scale"] = scale.reshape(layout.scale_shape).contiguous()
    return out


def prepare_model_for_quantization(model: nn.Module, config: QuantConfig, keep_dense: Iterable[str] = (),
                                   torch_dtype: torch.dtype | None = None) -> dict[str, LayerLayout]:
    """Swap the layers the config quantizes for empty quantized layers (meta device), skipping small ones.

    Skipped layers are appended to ``config.modules_to_not_convert`` by full ``.weight`` name, as sdnq does.
    """
    keep = [k for k in keep_dense if k]
    plans: dict[str, LayerLayout] = {}
    for name, module in model.named_modules():
        cls = sdnq_class_for(module)
        if cls is None or isinstance(module, SDNQLayerMixin):
            continue
        kind = layer_kind_of(cls.__name__)
        param = f"{name}.weight"
        shape = tuple(module.weight.shape)
        small = math.prod(shape) < config.minimum_allowed_numel or min(shape[:2]) < config.minimum_allowed_channel_size
        if config.is_skipped(param) or not config.quantizes_kind(kind) or small or any(k in name.split(".") for k in keep):
            if not config.is_skipped(param):
                config.modules_to_not_convert.append(param)
            continue
        try:
            plans[name] = plan_layer(kind, shape, config.options_for(param, kind))
        except ValueError:
            config.modules_to_not_convert.append(param)
    replace_with_sdnq_layers(model, plans, torch_dtype or torch.float32, companion_dtype=torch.float32)
    for name, layout in plans.items():
        # Until its dense weight arrives, the layer advertises the dense shape, so loaders accept the checkpoint.
        layer = model.get_submodule(name)
        layer._parameters["weight"] = nn.Parameter(
            torch.empty(layout.weight_shape, dtype=torch_dtype or torch.float32, device="meta"), requires_grad=False)
    return plans


def quantize_into(module: SDNQLayerMixin, name: str, value: torch.Tensor, device=None) -> None:
    """Loader hook: a dense ``weight`` is quantized into the layer's stored tensors; ``bias`` is copied."""
    if name != "weight":
        assign_stored_tensor(module, name, value, device)
        return
    if tuple(value.shape) != module.sdnq_layout.weight_shape:
        from .format import SDNQShapeError

        raise SDNQShapeError(f"dense weight has shape {list(value.shape)}, expected "
                             f"{list(module.sdnq_layout.weight_shape)}")
    for key, tensor in quantize_weight(value, module.sdnq_layout).items():
        assign_stored_tensor(module, key, tensor, device)
