"""Bit packing for every SDNQ width, driven by one table.

A width's layout is a list of *segments*: "bits ``lo..lo+n-1`` of value ``k`` of a chunk live at bits
``pos..pos+n-1`` of storage unit ``u``". A chunk is ``G`` consecutive values and packs into ``M`` units
(bytes for widths below 8, 16-bit words for widths 9-15). Packing and unpacking are the same
gather-shift-mask-scatter over that list, so there is exactly one implementation for all widths.

The layouts are SDNQ's (see ``SDNQ_FORMAT.md`` §1.2); they are checked at import for coverage (every bit of
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


def unpack(packed: torch.Tensor, bits: int, numel: int | None = None, *, name: str = "weight") -> torch.Tensor:
    """Inverse of :func:`pack`: returns int32 codes, flat, in ``[0, 2**bits)``.

    Accepts the on-disk quirks: uint1 bytes stored as int64, and 9-15-bit words stored as int16.
    ``numel``, when given, is checked against the packed size and the error names ``name``.
    """
    layout = LAYOUTS[bits]
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
    units = packed.reshape(chunks, layout.units_per_chunk).to(torch.int32)
    if layout.unit_bits == 16:
        units = units & 0xFFFF
    k, lo, mask, u, pos = _segment_tensors(bits, packed.device)
    parts = ((units[:, u] >> pos) & mask) << lo
    vals = torch.zeros(chunks, layout.values_per_chunk, dtype=torch.int32, device=packed.device)
    vals.index_add_(1, k, parts)
    return vals.reshape(-1)
