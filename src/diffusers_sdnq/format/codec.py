"""Dequantization: stored SDNQ tensors + a :class:`LayerLayout` → the dense float weight.

The order of operations follows the reference exactly (``docs/format-spec.md`` §4.2), because float rounding
depends on it and we promise bit-exact results: unpack → rebuild double-quantized scales → combine codes with
scale / zero point / codebook → undo transposition → reshape → add the SVD product → cast → undo Hadamard.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import torch

from . import floats, hadamard, packing
from .dtypes import QDType
from .errors import SDNQShapeError
from .layout import LayerLayout


def decode_codes(stored: torch.Tensor, qdtype: QDType, shape: tuple[int, ...], *, name: str = "weight",
                 legacy_subnormals: bool = False, out_dtype: torch.dtype = torch.float32,
                 out: torch.Tensor | None = None, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """Turn a stored code tensor into numbers (integers as floats, mini-floats decoded) of ``shape``.

    ``out`` (contiguous, ``out_dtype``, ``shape``'s element count) receives the result where the decode can write
    in place (native and packed integer codes into float32/float64), ``scratch`` is a byte buffer for the
    unpacker's temporaries: the blocked forward reuses both instead of allocating (and page-faulting) per block.
    The returned tensor is then ``out`` reshaped; elsewhere ``out`` is ignored and a new tensor is returned."""
    numel = 1
    for s in shape:
        numel *= s
    if qdtype.kind == "native":
        if stored.numel() != numel:
            raise SDNQShapeError(f"{name}: {stored.numel()} elements, expected {numel} for shape {list(shape)}")
        if out is not None and stored.dtype != out_dtype:
            return out.view(shape).copy_(stored.reshape(shape))
        return stored.reshape(shape).to(out_dtype)
    _check_storage(stored, qdtype, name)
    if qdtype.bits in (8, 16):
        if stored.numel() != numel:
            raise SDNQShapeError(f"{name}: {stored.numel()} code words, expected {numel} for shape {list(shape)}")
        codes = stored.reshape(-1).view(torch.int16 if stored.element_size() == 2 else torch.uint8).to(torch.int32)
        if stored.element_size() == 2:
            codes = codes & 0xFFFF
    elif qdtype.kind != "float" and out_dtype in (torch.float32, torch.float64):
        values = packing.unpack_to_float(stored, qdtype.bits, numel, dtype=out_dtype, name=name, out=out,
                                         scratch=scratch)
        if qdtype.signed:  # the offset is removed in the output dtype, after the cast, as the reference rounds it
            values += qdtype.qmin
        return values.reshape(shape)
    else:
        codes = packing.unpack_codes(stored, qdtype.bits, numel, name=name)  # uint8 / int16: 4x less traffic
    if qdtype.kind == "float":
        # every code through one table of all 2**bits decoded values: 25x faster than decoding each element,
        # and the same numbers, since each table entry is floats.decode of that code
        table = _float_table(qdtype, legacy_subnormals, codes.device)
        values = torch.index_select(table, 0, codes.reshape(-1).to(torch.int32))
    else:
        # Offset binary: the offset is removed in the output dtype, after the cast, as the reference rounds it.
        values = codes.to(out_dtype)
        if qdtype.signed:
            values = values + qdtype.qmin
        return values.reshape(shape)
    return values.reshape(shape).to(out_dtype)


@functools.cache
def _float_table(qdtype: QDType, legacy_subnormals: bool, device: torch.device) -> torch.Tensor:
    codes = torch.arange(2**qdtype.bits, dtype=torch.int32)
    return floats.decode(codes, qdtype, legacy_subnormals=legacy_subnormals).to(device)


def _check_storage(stored: torch.Tensor, qdtype: QDType, name: str) -> None:
    """Codes live in integer words of a fixed size: a float tensor (or int32 words) here is not SDNQ storage."""
    if qdtype.bits in (8, 16):
        ok = stored.element_size() * 8 == qdtype.bits and (not stored.is_floating_point() or qdtype.bits == 8)
        want = f"{qdtype.bits}-bit code words"
    elif qdtype.bits == 1:
        ok = stored.dtype in (torch.uint8, torch.int8, torch.int64)
        want = "uint8 bytes"
    else:
        ok = stored.dtype in ((torch.uint8, torch.int8) if qdtype.bits < 8 else (torch.int16, torch.uint16))
        want = "uint8 bytes" if qdtype.bits < 8 else "int16 words"
    if not ok:
        raise SDNQShapeError(f"{name}: {qdtype.name} codes must be stored as {want}, got "
                             f"{str(stored.dtype).replace('torch.', '')}")


def _dequantize_companion(tensors: Mapping[str, torch.Tensor], name: str, qdtype: QDType | None,
                          shape: tuple[int, ...], codebook: bool, scale_key: str, zero_key: str,
                          legacy_subnormals: bool) -> torch.Tensor:
    """A scale or zero point, rebuilding it first when it was itself quantized (tensor-wise)."""
    stored = tensors[name]
    if qdtype is None:
        return stored
    outer_scale = tensors[scale_key]
    if codebook:
        idx = decode_codes(stored, qdtype, shape, name=name, out_dtype=torch.float32).long()
        # indices were stored as plain unsigned codes; undo any signed offset the type applies
        if qdtype.signed:
            idx = idx - int(qdtype.qmin)
        return outer_scale.reshape(-1)[idx.reshape(-1)].reshape(shape)
    codes = decode_codes(stored, qdtype, shape, name=name, legacy_subnormals=legacy_subnormals,
                         out_dtype=outer_scale.dtype)
    if qdtype.needs_zero_point:
        return torch.addcmul(tensors[zero_key].reshape(()), codes, outer_scale.reshape(()))
    return codes * outer_scale.reshape(())


def dequantize(layout: LayerLayout, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None,
               *, prefix: str = "") -> torch.Tensor:
    """Rebuild the dense weight of one layer.

    ``tensors`` maps the layer's stored names (``weight``, ``scale``, ``zero_point``, ``svd_up``, ...) to
    tensors. ``dtype`` is the result dtype (default: the dtype of ``scale``, or float32 when the scale is
    itself quantized).
    """
    for key in ("weight", "scale"):
        if key not in tensors:
            raise SDNQShapeError(f"missing tensor '{prefix}{key}' for a {layout.dtype.name} layer")
    scale = _dequantize_companion(tensors, "scale", layout.scale_qdtype, layout.scale_shape, layout.codebook_scale,
                                  "scale_2", "scale_zero_point", layout.legacy_float_subnormals)
    if tuple(scale.shape) != layout.scale_shape:
        raise SDNQShapeError(f"'{prefix}scale' has shape {list(scale.shape)}, expected {list(layout.scale_shape)}")
    compute = scale.dtype
    if dtype is None:
        dtype = compute
    if layout.codebook:
        idx = decode_codes(tensors["weight"], layout.dtype, layout.quantized_shape, name=f"{prefix}weight",
                           out_dtype=torch.float32).long()
        axis = reduction_axis(layout)
        w = scale[idx] if scale.ndim == 1 else torch.gather(scale.expand(*_expand_for_gather(scale.shape, idx.shape, axis)), axis, idx)
    else:
        q = decode_codes(tensors["weight"], layout.dtype, layout.quantized_shape, name=f"{prefix}weight",
                         legacy_subnormals=layout.legacy_float_subnormals, out_dtype=compute)
        # in place when decoding made a new tensor (a native weight already in the scale's dtype is the stored one)
        fresh = layout.dtype.kind != "native" or tensors["weight"].dtype != compute
        if layout.has_zero_point:
            if "zero_point" not in tensors:
                raise SDNQShapeError(f"missing tensor '{prefix}zero_point' for unsigned dtype {layout.dtype.name}")
            zp = _dequantize_companion(tensors, "zero_point", layout.zero_point_qdtype, layout.scale_shape,
                                       layout.codebook_scale, "zero_point_scale", "zero_point_2",
                                       layout.legacy_float_subnormals)
            w = torch.addcmul(zp, q, scale, out=q) if fresh else torch.addcmul(zp, q, scale)
        else:
            w = q.mul_(scale) if fresh else q * scale
    if layout.transposed:
        w = w.t()
    w = w.reshape(layout.weight_shape)
    if layout.svd_rank:
        up, down = tensors["svd_up"], tensors["svd_down"]
        if layout.svd_transposed:
            up, down = up.t().contiguous(), down.t().contiguous()
        if w.ndim > 2:  # conv: the product is (out, in*k...), unflatten it onto the kernel dims
            w = w + torch.mm(up, down).reshape(layout.weight_shape)
        else:  # fused multiply-add in the factors' dtype, as the reference rounds it
            w = w.to(up.dtype).addmm_(up, down)
    w = w.to(dtype)
    if layout.hadamard_size:
        w = hadamard.rotate(w, layout.hadamard_size, legacy=layout.hadamard_legacy)
    return w


def reduction_axis(layout: LayerLayout) -> int:
    """Axis of the code tensor that a scale (or codebook table) reduces over."""
    grouped = layout.group_size > 0
    if layout.kind == "conv":
        return 2 if grouped else 1
    if layout.kind == "conv_transpose":
        return 1 if grouped else 0
    return len(layout.quantized_shape) - 1


def _expand_for_gather(scale_shape: torch.Size, idx_shape: torch.Size, axis: int) -> tuple[int, ...]:
    return tuple(s if i == axis else idx_shape[i] for i, s in enumerate(scale_shape))
