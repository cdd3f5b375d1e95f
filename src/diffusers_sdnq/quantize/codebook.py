"""Lloyd-Max codebooks (``use_codebook`` and ``use_codebook_scale``): per group, ``2**bits`` float levels.

Each group's values are sorted once; a Lloyd iteration then only needs the cell boundaries (a binary search of
the level midpoints in the sorted values) and prefix sums, so it costs O(levels · log n) per group instead of a
pass over every value. Levels start at the quantiles of the group (each cell holds the same number of values),
which for 1-D data is close to the optimum already; the iterations refine them to a local minimum of the
squared error.
"""

from __future__ import annotations

import torch

_CHUNK_VALUES = 1 << 22
"""Groups are fitted in chunks of about this many values, to bound the memory of sorting and indexing."""


def fit_levels(groups: torch.Tensor, levels: int, steps: int) -> torch.Tensor:
    """Fit ``levels`` sorted levels to each row of ``groups`` (shape (G, n)); returns (G, levels) float32."""
    g, n = groups.shape
    out = torch.empty(g, levels, dtype=torch.float32, device=groups.device)
    rows = max(1, _CHUNK_VALUES // max(n, 1))
    for start in range(0, g, rows):
        out[start:start + rows] = _fit_chunk(groups[start:start + rows].to(torch.float32), levels, steps)
    return out


def _fit_chunk(x: torch.Tensor, levels: int, steps: int) -> torch.Tensor:
    values, _ = torch.sort(x, dim=1)
    g, n = values.shape
    csum = torch.zeros(g, n + 1, dtype=torch.float64, device=x.device)
    csum[:, 1:] = torch.cumsum(values.to(torch.float64), dim=1)
    best, best_err = None, None
    for level in _starts(values, levels):
        level = _lloyd(values, csum, level, steps)
        err = _sse(values, level)
        if best is None:
            best, best_err = level, err
        else:
            better = (err < best_err).unsqueeze(1)
            best = torch.where(better, level, best)
            best_err = torch.minimum(err, best_err)
    return best.to(torch.float32)


def _starts(values: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """Two starting tables: evenly spaced between the group's extremes, and at its quantiles."""
    g, n = values.shape
    lo, hi = values[:, :1].to(torch.float64), values[:, -1:].to(torch.float64)
    steps = torch.arange(levels, device=values.device, dtype=torch.float64) / max(levels - 1, 1)
    uniform = lo + (hi - lo) * steps
    pos = ((torch.arange(levels, device=values.device, dtype=torch.float64) + 0.5) * n / levels).long()
    quantile = values[:, pos.clamp_(0, n - 1)].to(torch.float64)
    return [uniform, quantile]


def _cells(values: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """Boundaries (g, levels + 1) of the cells of sorted ``level`` in the sorted ``values``."""
    g, n = values.shape
    mids = ((level[:, :-1] + level[:, 1:]) / 2).to(values.dtype).contiguous()
    cut = torch.searchsorted(values.contiguous(), mids)
    return torch.cat([torch.zeros(g, 1, dtype=cut.dtype, device=values.device), cut,
                      torch.full((g, 1), n, dtype=cut.dtype, device=values.device)], dim=1)


def _sse(values: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """Squared error of each group when every value takes its nearest level."""
    nearest = level.gather(1, torch.searchsorted(((level[:, :-1] + level[:, 1:]) / 2).to(values.dtype).contiguous(),
                                                 values.contiguous()))
    return (values.to(torch.float64) - nearest).pow(2).sum(dim=1)


def _lloyd(values: torch.Tensor, csum: torch.Tensor, level: torch.Tensor, steps: int) -> torch.Tensor:
    g, n = values.shape
    for _ in range(max(0, int(steps))):
        level, _ = torch.sort(level, dim=1)
        edges = _cells(values, level)
        sums = csum.gather(1, edges[:, 1:]) - csum.gather(1, edges[:, :-1])
        counts = (edges[:, 1:] - edges[:, :-1]).to(torch.float64)
        level = torch.where(counts > 0, sums / counts.clamp_min(1), level)
    level, _ = torch.sort(level, dim=1)
    return level


def nearest_level(values: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index (into the unsorted ``levels``, shape (G, L)) of the level nearest each value (shape (G, n))."""
    order = torch.argsort(levels, dim=1)
    ordered = levels.gather(1, order)
    mids = ((ordered[:, :-1] + ordered[:, 1:]) / 2).contiguous()
    out = torch.empty(values.shape, dtype=torch.int64, device=values.device)
    rows = max(1, _CHUNK_VALUES // max(values.shape[1], 1))
    for start in range(0, values.shape[0], rows):
        sl = slice(start, start + rows)
        idx = torch.searchsorted(mids[sl], values[sl].contiguous())
        out[sl] = order[sl].gather(1, idx)
    return out
