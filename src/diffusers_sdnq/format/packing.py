"""Bit packing for every SDNQ width, driven by one table.

A width's layout is a list of *segments*: "bits ``lo..lo+n-1`` of value ``k`` of a chunk live at bits
``pos..pos+n-1`` of storage unit ``u``". A chunk is ``G`` consecutive values and packs into ``M`` units
(bytes for widths below 8, 16-bit words for widths 9-15). Packing and unpacking are the same
gather-shift-mask-scatter over that list, so there is exactly one implementation for all widths.

The layouts are SDNQ's (see ``docs/format-spec.md`` §1.2); they are checked at import for coverage (every bit of
every value stored exactly once, no unit bit used twice) and in the tests against the reference's bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch

from .errors import SDNQShapeError

Segment = tuple[int, int, int, int, int]
"""(value index k, first value bit lo, bit count n, unit index u, first unit bit pos)."""


def _plain(count: int, bits: int) -> list[Segment]:
    """Values 0..count-1 each fill the low ``bits`` of their own unit."""
    return [(k, 0, bits, k, 0) for k in range(count)]


def _w3() -> list[Segment]:
    segs = _plain(3, 3) + [(3 + i, 0, 3, i, 3) for i in range(3)]
    return segs + [(6, 0, 2, 0, 6), (7, 0, 2, 1, 6), (6, 2, 1, 2, 6), (7, 2, 1, 2, 7)]


def _w5() -> list[Segment]:
    segs = _plain(5, 5) + [(5 + i, 0, 3, i, 5) for i in range(3)]
    return segs + [(5, 3, 2, 3, 5), (6, 3, 2, 4, 5), (7, 3, 1, 4, 7), (7, 4, 1, 3, 7)]


def _w9() -> list[Segment]:
    return _plain(8, 9) + [s for j in range(8) for s in ((8 + j, 0, 7, j, 9), (8 + j, 7, 2, 8, 2 * j))]


def _w10() -> list[Segment]:
    segs = _plain(5, 10) + [(5 + i, 0, 6, i, 10) for i in range(3)]
    return segs + [(5, 6, 4, 3, 10), (6, 6, 4, 4, 10), (7, 6, 2, 4, 14), (7, 8, 2, 3, 14)]


def _w11() -> list[Segment]:
    segs = _plain(8, 11) + [(8 + j, 0, 5, j, 11) for j in range(8)]
    segs += [(8 + i, 5, 6, 8 + i, 0) for i in range(3)] + [(11 + i, 5, 6, 8 + i, 6) for i in range(3)]
    return segs + [(14, 5, 4, 8, 12), (14, 9, 2, 10, 12), (15, 5, 4, 9, 12), (15, 9, 2, 10, 14)]


def _w13() -> list[Segment]:
    segs = _plain(13, 13)
    for t in range(3):
        segs += [(13 + t, 3 * k, 3, 3 * k + t, 13) for k in range(4)] + [(13 + t, 12, 1, 12, 13 + t)]
    return segs


@dataclass(frozen=True)
class PackLayout:
    """How one width packs: ``values_per_chunk`` values into ``units_per_chunk`` units."""

    bits: int
    values_per_chunk: int
    units_per_chunk: int
    unit_bits: int
    segments: tuple[Segment, ...]

    @property
    def flat(self) -> bool:
        """Widths 1, 2 and 4 are stored as a 1-D byte string; the rest as (chunks, units)."""
        return self.bits in (1, 2, 4)


LAYOUTS: dict[int, PackLayout] = {
    1: PackLayout(1, 8, 1, 8, tuple((k, 0, 1, 0, k) for k in range(8))),
    2: PackLayout(2, 4, 1, 8, tuple((k, 0, 2, 0, 2 * k) for k in range(4))),
    3: PackLayout(3, 8, 3, 8, tuple(_w3())),
    4: PackLayout(4, 2, 1, 8, ((0, 0, 4, 0, 0), (1, 0, 4, 0, 4))),
    5: PackLayout(5, 8, 5, 8, tuple(_w5())),
    6: PackLayout(6, 4, 3, 8, tuple(_plain(3, 6) + [(3, 0, 2, 2, 6), (3, 2, 2, 1, 6), (3, 4, 2, 0, 6)])),
    7: PackLayout(7, 8, 7, 8, tuple(_plain(7, 7) + [(7, k, 1, 6 - k, 7) for k in range(7)])),
    9: PackLayout(9, 16, 9, 16, tuple(_w9())),
    10: PackLayout(10, 8, 5, 16, tuple(_w10())),
    11: PackLayout(11, 16, 11, 16, tuple(_w11())),
    12: PackLayout(12, 4, 3, 16, tuple(_plain(3, 12) + [(3, 4 * i, 4, 2 - i, 12) for i in range(3)])),
    13: PackLayout(13, 16, 13, 16, tuple(_w13())),
    14: PackLayout(14, 8, 7, 16, tuple(_plain(7, 14) + [(7, 2 * k, 2, 6 - k, 14) for k in range(7)])),
    15: PackLayout(15, 16, 15, 16, tuple(_plain(15, 15) + [(15, k, 1, 14 - k, 15) for k in range(15)])),
}
"""Packed widths → layout. Widths 8 and 16 are never packed."""


def _check_layout(layout: PackLayout) -> None:
    value_bits = {(k, b) for k in range(layout.values_per_chunk) for b in range(layout.bits)}
    unit_bits: set[tuple[int, int]] = set()
    seen: set[tuple[int, int]] = set()
    for k, lo, n, u, pos in layout.segments:
        for i in range(n):
            assert (k, lo + i) not in seen, (layout.bits, "value bit twice", k, lo + i)
            assert (u, pos + i) not in unit_bits, (layout.bits, "unit bit twice", u, pos + i)
            assert pos + i < layout.unit_bits and u < layout.units_per_chunk, (layout.bits, u, pos + i)
            seen.add((k, lo + i))
            unit_bits.add((u, pos + i))
    assert seen == value_bits, (layout.bits, "missing value bits", value_bits - seen)
    assert layout.values_per_chunk * layout.bits == layout.units_per_chunk * layout.unit_bits, layout.bits


for _layout in LAYOUTS.values():
    _check_layout(_layout)


@cache
def _segment_tensors(bits: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    segs = torch.tensor(LAYOUTS[bits].segments, dtype=torch.int64, device=device)
    k, lo, n, u, pos = segs.unbind(1)
    mask = (1 << n) - 1
    return k, lo.int(), mask.int(), u, pos.int()


def packed_shape(numel: int, bits: int) -> tuple[int, ...]:
    """Shape of the packed tensor for ``numel`` codes of width ``bits``."""
    layout = LAYOUTS[bits]
    if numel % layout.values_per_chunk:
        raise SDNQShapeError(
            f"{numel} values of width {bits} cannot be packed: the count must be a multiple of "
            f"{layout.values_per_chunk}"
        )
    chunks = numel // layout.values_per_chunk
    if layout.flat:
        return (chunks * layout.units_per_chunk,)
    return (chunks, layout.units_per_chunk)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative integer codes (< 2**bits) into SDNQ's layout for ``bits``.

    Returns uint8 for widths below 8 and int16 (the 16-bit words' bit pattern) for widths 9-15.
    """
    layout = LAYOUTS[bits]
    shape = packed_shape(codes.numel(), bits)
    k, lo, mask, u, pos = _segment_tensors(bits, codes.device)
    vals = codes.reshape(-1, layout.values_per_chunk).to(torch.int32)
    parts = ((vals[:, k] >> lo) & mask) << pos
    units = torch.zeros(vals.shape[0], layout.units_per_chunk, dtype=torch.int32, device=codes.device)
    units.index_add_(1, u, parts)  # segments never share a bit, so adding is OR-ing
    out = units.to(torch.uint8) if layout.unit_bits == 8 else units.to(torch.int16)
    return out.reshape(shape)


def _check_units(packed: torch.Tensor, layout: PackLayout, numel: int | None, name: str) -> int:
    """Number of chunks in ``packed``; raises naming ``name`` when the size does not fit the width."""
    bits = layout.bits
    units_total = packed.numel()
    if units_total % layout.units_per_chunk:
        raise SDNQShapeError(
            f"{name}: {units_total} packed {'bytes' if layout.unit_bits == 8 else 'words'} is not a multiple of "
            f"{layout.units_per_chunk}, so it cannot hold {bits}-bit values"
        )
    chunks = units_total // layout.units_per_chunk
    if numel is not None and chunks * layout.values_per_chunk != numel:
        expect = packed_shape(numel, bits)
        raise SDNQShapeError(
            f"{name}: packed tensor of shape {tuple(packed.shape)} holds {chunks * layout.values_per_chunk} "
            f"{bits}-bit values, expected {numel} (packed shape {expect})"
        )
    return chunks


@cache
def _runs(bits: int) -> tuple[tuple[int, int, int, int, int, int], ...]:
    """The layout's segments merged into runs (k0, lo, n, u0, pos, count): ``count`` consecutive values stored
    at the same bits of ``count`` consecutive units, so one shift-and-mask over a column slice decodes them all."""
    runs: list[list[int]] = []
    for k, lo, n, u, pos in LAYOUTS[bits].segments:
        last = runs[-1] if runs else None
        if last and (lo, n, pos) == (last[1], last[2], last[4]) and k == last[0] + last[5] and u == last[3] + last[5]:
            last[5] += 1
        else:
            runs.append([k, lo, n, u, pos, 1])
    return tuple(tuple(r) for r in runs)  # type: ignore[misc]


def unpack_codes(packed: torch.Tensor, bits: int, numel: int | None = None, *, name: str = "weight") -> torch.Tensor:
    """Like :func:`unpack`, but the codes come back in the narrowest integer dtype that holds them (uint8 below 8
    bits, int16 for 9-15): decoding touches 4x fewer bytes than with int32, which is most of its cost."""
    layout = LAYOUTS[bits]
    chunks = _check_units(packed, layout, numel, name)
    units = _units(packed, layout, chunks)
    work = units.dtype
    if layout.flat:  # 1, 2 and 4 bits: values side by side in one byte, lowest first
        mask = (1 << bits) - 1
        cols = []
        for k in range(layout.values_per_chunk):
            col = units >> (k * bits) if k else units
            cols.append(col if (k + 1) * bits == 8 else col & mask)
        return torch.stack(cols, dim=-1).reshape(-1)
    vals = torch.zeros(chunks, layout.values_per_chunk, dtype=work, device=packed.device)
    for k0, lo, n, u0, pos, count in _runs(bits):
        part = units[:, u0:u0 + count]
        if pos:
            part = part >> pos
        if pos + n < layout.unit_bits or work == torch.int16:
            part = part & ((1 << n) - 1)
        if lo:
            part = part << lo
        vals[:, k0:k0 + count] |= part
    return vals.reshape(-1)


def _units(packed: torch.Tensor, layout: PackLayout, chunks: int) -> torch.Tensor:
    """The storage units as (chunks, units) uint8 bytes or int16 words (arithmetic shifts of int16 are fine:
    every part is masked below its unit's top bit)."""
    units = packed.reshape(chunks, layout.units_per_chunk)
    if layout.unit_bits == 16:
        return units.view(torch.int16) if units.dtype == torch.uint16 else units.to(torch.int16)
    if units.dtype == torch.int8:
        return units.view(torch.uint8)
    return units if units.dtype == torch.uint8 else units.to(torch.uint8)  # uint1 bytes stored as int64


def unpack_to_float(packed: torch.Tensor, bits: int, numel: int | None = None, *, dtype: torch.dtype = torch.float32,
                    name: str = "weight", out: torch.Tensor | None = None,
                    scratch: torch.Tensor | None = None) -> torch.Tensor:
    """Codes as float32/float64 numbers, written straight into the result (no int tensor of full size, no extra
    conversion pass). Segments never share a bit, so adding the parts is OR-ing them, and every sum is an integer
    below 2**16: exact in these dtypes, hence equal to converting :func:`unpack`'s codes.

    ``out``: a contiguous ``dtype`` tensor with room for the values, used as the result. ``scratch``: a uint8
    tensor of at least ``2 * packed.numel()`` bytes for the shifted parts (else they are allocated)."""
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"unpack_to_float writes float32 or float64, not {dtype}")
    layout = LAYOUTS[bits]
    chunks = _check_units(packed, layout, numel, name)
    units = _units(packed, layout, chunks)
    total = chunks * layout.values_per_chunk
    result = out.reshape(-1)[:total] if out is not None else torch.empty(total, dtype=dtype, device=packed.device)
    values = result.view(chunks, layout.values_per_chunk)
    filled = [False] * layout.values_per_chunk
    for k0, lo, n, u0, pos, count in _runs(bits):
        src = units[:, u0:u0 + count]
        part = None
        if scratch is not None:
            part = scratch.view(units.dtype)[:chunks * count].view(chunks, count)
        if pos:
            part = torch.bitwise_right_shift(src, pos, out=part) if part is not None else src >> pos
            src = part
        if pos + n < layout.unit_bits or layout.unit_bits == 16:
            part = torch.bitwise_and(src, (1 << n) - 1, out=part) if part is not None else src & ((1 << n) - 1)
            src = part
        if lo:
            part = torch.bitwise_left_shift(src, lo, out=part) if part is not None else src << lo
            src = part
        target = values[:, k0:k0 + count]
        if any(filled[k0:k0 + count]):
            target += src
        else:
            target.copy_(src)
            filled[k0:k0 + count] = [True] * count
    return result


def unpack(packed: torch.Tensor, bits: int, numel: int | None = None, *, name: str = "weight") -> torch.Tensor:
    """Inverse of :func:`pack`: returns int32 codes, flat, in ``[0, 2**bits)``.

    Accepts the on-disk quirks: uint1 bytes stored as int64, and 9-15-bit words stored as int16.
    ``numel``, when given, is checked against the packed size and the error names ``name``.
    """
    return unpack_codes(packed, bits, numel, name=name).to(torch.int32)
