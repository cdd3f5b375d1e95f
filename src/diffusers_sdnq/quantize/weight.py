"""One dense weight → the tensors an SDNQ layer stores, for every layout :func:`format.plan_layer` can produce.

The steps mirror the decoder (``format/codec.py``) in reverse: Hadamard rotation, low-rank (SVD) split, grouping /
transposition into the code tensor's shape, then either an affine grid (scale, zero point) or a codebook per
group, with the scale and zero point themselves quantized when the layout asks for it. Every later step uses the
values the decoder will really see (factors rounded to the model dtype, scales rounded to their stored dtype or
rebuilt from their own codes), so rounding introduced by one step is absorbed by the next instead of added up.
"""

from __future__ import annotations

import math

import torch

from ..format import codec, hadamard
from ..format.dtypes import QDType
from ..format.errors import SDNQShapeError
from ..format.layout import LayerLayout, companion_dtype
from . import codebook as cb
from .codes import grid_limits, round_to_grid, store
from .lowrank import low_rank

_MODEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_COMPANION_KEYS = {"scale": ("scale_2", "scale_zero_point"), "zero_point": ("zero_point_scale", "zero_point_2")}


def quantize_weight(weight: torch.Tensor, layout: LayerLayout, *, dtype: torch.dtype | None = None, seed: int = 0,
                    svd_steps: int = 8, codebook_steps: int = 24,
                    svd_factors: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Quantize ``weight`` (the layer's dense weight, shape ``layout.weight_shape``) into ``layout``.

    ``dtype`` is the model dtype: SVD factors are stored in it, and so are scales when the layout's options turn
    ``dequantize_fp32`` off (default: ``weight.dtype`` for float32/bfloat16/float16 weights, else float32).
    ``seed`` makes the randomized SVD reproducible; ``svd_steps`` / ``codebook_steps`` are the config's
    iteration counts. ``svd_factors``, when given, caches the float32 low-rank factors across calls on the same
    weight (dynamic quantization tries many types on one layer). Returns ``{stored name: tensor}`` (``bias`` excluded), ready for the layer's parameters.
    """
    shape = layout.weight_shape
    if tuple(weight.shape) != shape:
        raise SDNQShapeError(f"dense weight has shape {list(weight.shape)}, expected {list(shape)} for {layout.kind} "
                             f"layer quantized as {layout.dtype.name}")
    model_dtype = dtype or (weight.dtype if weight.dtype in _MODEL_DTYPES else torch.float32)
    w = weight.detach().to(torch.float32)
    if not bool(torch.isfinite(w).all()):
        raise SDNQShapeError(f"dense weight of shape {list(shape)} contains NaN or inf; it cannot be quantized")
    if layout.hadamard_size:
        w = hadamard.rotate(w, layout.hadamard_size, legacy=layout.hadamard_legacy)
    out: dict[str, torch.Tensor] = {}
    if layout.svd_rank:
        key = f"{layout.svd_rank}:{layout.hadamard_size}"
        if svd_factors is not None and key in svd_factors:
            up, down = svd_factors[key], svd_factors[key + ":down"]
        else:
            up, down = low_rank(w.reshape(shape[0], -1), layout.svd_rank, svd_steps, seed)
            if svd_factors is not None:
                svd_factors[key], svd_factors[key + ":down"] = up, down
        up, down = up.to(model_dtype), down.to(model_dtype)
        w = w - (up.float() @ down.float()).reshape(shape)
        if layout.svd_transposed:
            up, down = up.t(), down.t()
        out["svd_up"], out["svd_down"] = up.contiguous(), down.contiguous()
    x = arrange(w, layout)
    cdtype = companion_dtype(layout.dtype, layout.options.dequantize_fp32, model_dtype)
    if layout.codebook:
        out.update(_codebook(x, layout, cdtype, codebook_steps))
    else:
        out.update(_affine(x, layout, cdtype, codebook_steps))
    return out


def arrange(w: torch.Tensor, layout: LayerLayout) -> torch.Tensor:
    """The dense weight in the code tensor's shape: grouped, flattened for a matmul, or transposed."""
    if layout.transposed:
        return w.reshape(layout.weight_shape[0], -1).t().reshape(layout.quantized_shape)
    return w.reshape(layout.quantized_shape)


def reduction_axes(layout: LayerLayout) -> tuple[int, ...]:
    """Axes of the code tensor one scale covers (all of them for a tensor-wise scale)."""
    qshape, sshape = layout.quantized_shape, layout.scale_shape
    if layout.group_size == -2:
        return tuple(range(len(qshape)))
    return tuple(i for i, (q, s) in enumerate(zip(qshape, sshape, strict=True)) if s == 1 and q != 1)


def _affine(x: torch.Tensor, layout: LayerLayout, cdtype: torch.dtype, steps: int) -> dict[str, torch.Tensor]:
    """Scale (and zero point for unsigned types) per group; codes on the type's grid."""
    dt = layout.dtype
    axes = reduction_axes(layout)
    lo, hi = grid_limits(dt)
    out: dict[str, torch.Tensor] = {}
    if dt.signed:
        scale = x.abs().amax(dim=axes, keepdim=True) / hi
        zero = None
    else:
        zero = x.amin(dim=axes, keepdim=True)
        scale = (x.amax(dim=axes, keepdim=True) - zero) / (hi - lo)
    scale_used = _companion(out, "scale", scale.reshape(layout.scale_shape), layout.scale_qdtype, cdtype,
                            layout.codebook_scale, steps, layout)
    scale_used = scale_used.reshape(scale.shape).to(torch.float32)
    safe = torch.where(scale_used > 0, scale_used, torch.ones_like(scale_used))
    # (a group whose scale is 0 decodes to its zero point / to 0 whatever its codes are)
    if zero is not None:
        zero_used = _companion(out, "zero_point", zero.reshape(layout.scale_shape), layout.zero_point_qdtype, cdtype,
                               layout.codebook_scale, steps, layout)
        values = (x - zero_used.reshape(zero.shape).to(torch.float32)).div_(safe)
    else:
        values = x / safe
    out["weight"] = store(round_to_grid(values, dt, inplace=True), dt, layout.quantized_shape)
    return out


def _codebook(x: torch.Tensor, layout: LayerLayout, cdtype: torch.dtype, steps: int) -> dict[str, torch.Tensor]:
    """A Lloyd-Max level table per group (stored as ``scale``) and each value's level index as the codes."""
    levels_n = 2**layout.dtype.bits
    tensorwise = len(layout.scale_shape) == 1
    axis = 0 if tensorwise else codec.reduction_axis(layout)
    moved = x.reshape(1, -1) if tensorwise else x.movedim(axis, -1)
    groups = moved.reshape(-1, moved.shape[-1])
    levels = cb.fit_levels(groups, levels_n, steps)
    shaped = levels.reshape(layout.scale_shape) if tensorwise else \
        levels.reshape(*moved.shape[:-1], levels_n).movedim(-1, axis)
    out: dict[str, torch.Tensor] = {}
    used = _companion(out, "scale", shaped.contiguous(), layout.scale_qdtype, cdtype, layout.codebook_scale, steps,
                      layout).to(torch.float32)
    used = used.reshape(1, -1) if tensorwise else used.movedim(axis, -1).reshape(-1, levels_n)
    idx = cb.nearest_level(groups, used)
    codes = idx.reshape(moved.shape).to(torch.float32)
    codes = codes.reshape(layout.quantized_shape) if tensorwise else codes.movedim(-1, axis)
    out["weight"] = store(codes, layout.dtype, layout.quantized_shape)
    return out


def _companion(out: dict[str, torch.Tensor], name: str, values: torch.Tensor, qdtype: QDType | None,
               cdtype: torch.dtype, codebook_scale: bool, steps: int, layout: LayerLayout) -> torch.Tensor:
    """Store a scale / zero point (or level table) into ``out``; return the values the decoder will rebuild.

    Without a ``qdtype`` it is kept as floats of ``cdtype``. With one it is quantized tensor-wise: a single
    outer scale (plus an outer zero point for unsigned types), or with ``codebook_scale`` a flat table of
    ``2**bits`` levels, exactly the double quantization the format defines.
    """
    if qdtype is None:
        stored = values.to(cdtype).contiguous()
        out[name] = stored
        return stored
    scale_key, zero_key = _COMPANION_KEYS[name]
    shape = tuple(values.shape)
    flat = values.reshape(1, -1).to(torch.float32)
    parts: dict[str, torch.Tensor] = {}
    if codebook_scale:
        table = cb.fit_levels(flat, 2**qdtype.bits, steps)
        idx = cb.nearest_level(flat, table)
        parts[name] = store(idx.reshape(shape).to(torch.float32), qdtype, shape)
        parts[scale_key] = table.reshape(-1).contiguous()
    else:
        lo, hi = grid_limits(qdtype)
        if qdtype.signed:
            outer = flat.abs().amax().reshape(1) / hi
            base = None
        else:
            base = flat.amin().reshape(1)
            outer = (flat.amax().reshape(1) - base) / (hi - lo)
        safe = outer if float(outer) > 0 else torch.ones_like(outer)
        grid = round_to_grid(((flat - base) if base is not None else flat) / safe, qdtype)
        parts[name] = store(grid.reshape(shape), qdtype, shape)
        parts[scale_key] = safe.contiguous()
        if base is not None:
            parts[zero_key] = base.contiguous()
    out.update(parts)
    return codec._dequantize_companion(parts, name, qdtype, shape, codebook_scale, scale_key, zero_key,
                                       layout.legacy_float_subnormals)


def relative_error(dense: torch.Tensor, approx: torch.Tensor) -> float:
    """Mean squared error over the mean square of the dense weight (the loss dynamic quantization thresholds)."""
    d = dense.detach().to(torch.float32)
    e = approx.detach().to(torch.float32) - d
    denom = d.pow(2).mean().item()
    return e.pow(2).mean().item() / denom if denom > 0 else (0.0 if e.abs().max().item() == 0 else math.inf)
