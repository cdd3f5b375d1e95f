"""Dense shapes and layouts recovered from a layer's stored tensors, for when the model class is not available.

Every (kind, dense shape) that the stored sizes allow is planned and checked against the tensors; only layouts
that fit are kept. With a config the width is known and a unique fit is required. Without one (a bare
``.safetensors`` file) every width is tried with default options and the result is marked as guessed: the bytes
show the width, grouping and zero point, not whether the codes are integers or mini-floats.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..format import LayerLayout, LayerOptions, StoredFacts, check_stored, get_dtype, infer_stored, plan_layer
from ..format.config import QuantConfig
from ..format.errors import SDNQFormatError
from ..format.packing import LAYOUTS, packed_shape
from ..layers.replace import TensorMeta


def _unpacked_numel(shape: tuple[int, ...], dtype: torch.dtype, bits: int) -> int | None:
    """How many codes of width ``bits`` a stored weight holds, if that width fits its shape and dtype."""
    if bits in (8, 16) or bits not in LAYOUTS:
        return math.prod(shape)
    unit = 8 if dtype in (torch.uint8, torch.int64) else 16 if dtype in (torch.int16, torch.uint16) else 0
    if not unit or (bits > 8) != (unit == 16):
        return None
    numel = math.prod(shape) * unit // bits
    try:
        return numel if packed_shape(numel, bits) == shape else None
    except SDNQFormatError:
        return None


def _shape_candidates(keys: Mapping[str, TensorMeta], numel: int) -> list[tuple[str, tuple[int, ...]]]:
    """Every (kind, dense shape) the stored sizes allow for ``numel`` weight elements."""
    dims: set[int] = set()
    for key in ("scale", "zero_point", "svd_up", "svd_down", "weight"):
        if key in keys:
            dims.update(d for d in keys[key][0] if d > 1)
    out: list[tuple[str, tuple[int, ...]]] = []
    for d in sorted(dims):
        if numel % d == 0:
            out += [("linear", (d, numel // d)), ("embedding", (d, numel // d))]
    scale = keys["scale"][0] if "scale" in keys else ()
    for k_start in (2, 3):  # conv scales: (out, 1, *k) row-wise, (out, groups, 1, *k) grouped
        if len(scale) > k_start:
            kernel = scale[k_start:]
            kn = math.prod(kernel)
            for out_ch in {scale[0]} | dims:
                if out_ch and numel % (out_ch * kn) == 0:
                    out.append(("conv", (out_ch, numel // (out_ch * kn), *kernel)))
    if len(scale) >= 3 and scale[0] == 1:  # conv-transpose: (1, out, *k)
        out_ch, kernel = scale[1], scale[2:]
        kn = math.prod(kernel)
        if numel % (out_ch * kn) == 0:
            out.append(("conv_transpose", (numel // (out_ch * kn), out_ch, *kernel)))
    return out


def _decodes_same(a: LayerLayout, b: LayerLayout) -> bool:
    same_kind = a.kind == b.kind or {a.kind, b.kind} == {"linear", "embedding"}
    return same_kind and (a.weight_shape, a.quantized_shape, a.scale_shape, a.transposed, a.svd_transposed,
                          a.dtype.name, a.hadamard_size, a.codebook) == (
        b.weight_shape, b.quantized_shape, b.scale_shape, b.transposed, b.svd_transposed, b.dtype.name,
        b.hadamard_size, b.codebook)


def _fit(name: str, keys: Mapping[str, TensorMeta], candidates: list[tuple[str, tuple[int, ...]]],
         options: Callable[[str], Any]) -> tuple[list[LayerLayout], str | None]:
    """Plan every candidate and keep those whose plan the stored tensors fit; also the first mismatch message."""
    fits: list[LayerLayout] = []
    first_error: str | None = None
    for kind, shape in candidates:
        try:
            layout = plan_layer(kind, shape, options(kind))
            fits.append(check_stored(layout, keys, prefix=f"{name}."))
        except ValueError as exc:
            first_error = first_error or str(exc)
    unique: list[LayerLayout] = []
    for layout in fits:
        if not any(_decodes_same(layout, u) for u in unique):
            unique.append(layout)
    return unique, first_error


def infer_with_config(name: str, keys: Mapping[str, TensorMeta], quant: QuantConfig) -> LayerLayout:
    """Dense shape from the stored sizes and the config's width for this layer; a unique fit is required."""
    dt = get_dtype(quant.options_for(f"{name}.weight", "linear").weights_dtype)
    w_shape, w_dtype = keys["weight"]
    numel = _unpacked_numel(w_shape, w_dtype, dt.bits) if dt.packed else math.prod(w_shape)
    if numel is None:
        raise SDNQFormatError(f"'{name}.weight' is {str(w_dtype).replace('torch.', '')} {list(w_shape)}, which "
                              f"cannot hold {dt.name} codes (the config's dtype for this layer)")
    fits, error = _fit(name, keys, _shape_candidates(keys, numel),
                       lambda kind: quant.options_for(f"{name}.weight", kind))
    if len(fits) == 1:
        return fits[0]
    if not fits:
        raise SDNQFormatError(error or f"layer '{name}': no dense shape fits its stored tensors")
    shapes = ", ".join(f"{f.kind} {list(f.weight_shape)}" for f in fits)
    raise SDNQFormatError(f"layer '{name}': the stored tensors fit several dense shapes ({shapes}); the model "
                          "class is needed to decide (install the library that defines it)")


def guess_without_config(name: str, keys: Mapping[str, TensorMeta]) -> tuple[LayerLayout | None, StoredFacts | None,
                                                                              str, tuple[int, ...]]:
    """Width, grouping and dense shape from the tensors alone: try every width with default options."""
    w_shape, w_dtype = keys["weight"]
    has_zp = "zero_point" in keys
    rank = min(keys["svd_up"][0]) if "svd_up" in keys and keys["svd_up"][0] else 0
    widths = [b for b in sorted(LAYOUTS) if b not in (8, 16)] + [8, 16]
    fits: list[LayerLayout] = []
    facts_seen: list[tuple[StoredFacts, str, tuple[int, ...]]] = []
    for bits in widths:
        numel = _unpacked_numel(w_shape, w_dtype, bits)
        if numel is None:
            continue
        if bits in (8, 16):
            native = {torch.int8: "int8", torch.uint8: "uint8", torch.int16: "int16", torch.uint16: "uint16",
                      torch.float8_e4m3fn: "float8_e4m3fn", torch.float8_e5m2: "float8_e5m2",
                      torch.float16: "float16", torch.bfloat16: "bfloat16"}
            if w_dtype not in native or torch.empty((), dtype=w_dtype).element_size() * 8 != bits:
                continue
            dtype_name = native[w_dtype]
        else:
            dtype_name = f"{'u' if has_zp else ''}int{bits}"
        candidates = _shape_candidates(keys, numel)
        opts = LayerOptions(weights_dtype=dtype_name, use_svd=bool(rank), svd_rank=rank or 32)
        layouts, _ = _fit(name, keys, candidates, lambda kind, o=opts: o)
        fits += layouts
        for kind, shape in candidates:
            facts = infer_stored(kind, shape, keys)
            if facts.bits == bits and facts.group_size is not None:
                facts_seen.append((facts, kind, shape))
    if fits:
        best = min(fits, key=lambda f: f.dtype.bits)  # several fits: report the narrowest, marked as a guess
        return best, None, best.kind, best.weight_shape
    if facts_seen:
        facts, kind, shape = facts_seen[0]
        return None, facts, kind, shape
    return None, infer_stored("linear", w_shape, keys), "linear", tuple(w_shape)
