"""Values → stored codes for every SDNQ weight type, and the storage dtype of float companions.

The inverse of :func:`diffusers_sdnq.format.codec.decode_codes`: integers are rounded half-to-even and stored as
offset binary when signed, SDNQ mini-floats are encoded round-to-nearest by :func:`format.floats.encode`,
native torch types are a cast. Everything that reaches :func:`store` is already scaled into the type's range.
"""

from __future__ import annotations

import math

import torch

from ..format import floats, packing
from ..format.dtypes import QDType


def grid_limits(qdtype: QDType) -> tuple[float, float]:
    """Lowest and highest value the writer maps a group onto (before any signed offset).

    Symmetric (signed) types use ``[-qmax, qmax]``; asymmetric integers every code ``[0, 2**bits - 1]`` (for
    uint9..uint15 the table's ``qmax`` is ``2**bits``, one more than fits, so the real top code is used);
    unsigned floats ``[0, qmax]``.
    """
    if qdtype.signed:
        return -float(qdtype.qmax), float(qdtype.qmax)
    if qdtype.is_integer:
        return 0.0, float(2**qdtype.bits - 1)
    return 0.0, float(qdtype.qmax)


def round_to_grid(x: torch.Tensor, qdtype: QDType, *, inplace: bool = False) -> torch.Tensor:
    """Round scaled values to the nearest value of ``qdtype`` (as float32), clamped to its range.

    ``inplace`` lets integer types reuse ``x`` (a temporary of the caller) instead of allocating another copy.
    """
    lo, hi = grid_limits(qdtype)
    if qdtype.is_integer:
        return (x.round_() if inplace else torch.round(x)).clamp_(lo, hi)
    if qdtype.kind == "native":
        return x.clamp(lo, hi).to(qdtype.torch_dtype).to(torch.float32)
    return floats.decode(floats.encode(x, qdtype), qdtype)


def store(values: torch.Tensor, qdtype: QDType, shape: tuple[int, ...]) -> torch.Tensor:
    """The stored tensor for values already on the grid of ``qdtype`` (see :func:`round_to_grid`).

    Native types keep ``shape`` in their torch dtype; 8/16-bit SDNQ floats keep ``shape`` as raw code words;
    every other width is packed flat (uint1 as int64 bytes, the layout the reference's own loader expects).
    """
    if qdtype.kind == "native":
        if qdtype.is_integer:
            values = values.to(torch.int64)
        return values.to(qdtype.torch_dtype).reshape(shape).contiguous()
    if qdtype.kind == "float":
        codes = floats.encode(values, qdtype)
    else:
        codes = values.to(torch.int32)
        if qdtype.signed:
            codes = codes - int(qdtype.qmin)  # offset binary
    if qdtype.bits == 8:
        return codes.to(torch.uint8).reshape(shape).contiguous()
    if qdtype.bits == 16:
        return codes.to(torch.uint16).reshape(shape).contiguous()
    packed = packing.pack(codes.reshape(-1), qdtype.bits)
    if qdtype.bits == 1:
        packed = packed.to(torch.int64)
    return packed


def check_packable(qdtype: QDType, numel: int, what: str) -> None:
    """Packed widths need whole chunks; say so before any work is done."""
    if qdtype.kind == "native" or qdtype.bits in (8, 16):
        return
    chunk = packing.LAYOUTS[qdtype.bits].values_per_chunk
    if numel % chunk:
        from ..format.errors import SDNQShapeError

        raise SDNQShapeError(f"{what}: {numel} values cannot be packed as {qdtype.name} (needs a multiple of "
                             f"{chunk}, {math.ceil(numel / chunk) * chunk - numel} short)")
