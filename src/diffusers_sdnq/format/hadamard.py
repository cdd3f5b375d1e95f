"""Hadamard rotation used by ``use_hadamard`` layers.

The matrix is symmetric and orthonormal, so the same right-multiplication that rotated the weight before
quantization restores it after dequantization.
"""

from __future__ import annotations

import math
from functools import cache

import torch


@cache
def _hadamard_cpu(size: int, legacy: bool) -> torch.Tensor:
    power_of_4 = size >= 4 and (size & (size - 1)) == 0 and int(math.log2(size)) % 2 == 0
    if power_of_4 and not legacy:
        # Kronecker power of the 4x4 block that is +1 everywhere but the anti-diagonal (sdnq >= 0.2.0).
        base = torch.ones(4, 4, dtype=torch.float64) - 2 * torch.eye(4, dtype=torch.float64).flip(1)
    else:
        base = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < size:
        h = torch.kron(h, base)
    assert h.shape[0] == size, f"Hadamard size {size} is not a power of two"
    return (h / math.sqrt(size)).to(torch.float32)


def hadamard_matrix(size: int, *, legacy: bool | str = False, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """The normalised ``size``×``size`` Hadamard matrix SDNQ uses (``legacy=True``: the pre-0.2.0 Sylvester one)."""
    return _hadamard_cpu(size, legacy is True).to(device=device, dtype=dtype)


def rotate(weight: torch.Tensor, size: int, *, legacy: bool | str = False) -> torch.Tensor:
    """Right-multiply each block of ``size`` consecutive elements along the flattened input dims by H.

    ``legacy`` names the writing release's way: ``False`` (sdnq 0.2.0 and >= 0.2.2) and ``True`` (0.1.9, Sylvester
    matrix) multiply the blocks as a batched matmul; ``"0.2.1"`` applied H as a linear layer (``x @ H.T``), whose
    float sums round differently for small blocks, so the result differs in the last bit.
    """
    h = hadamard_matrix(size, legacy=legacy, dtype=weight.dtype, device=weight.device)
    shape = weight.shape
    if legacy == "0.2.1":
        return torch.nn.functional.linear(weight.contiguous().reshape(-1, size), h).reshape(shape)
    if legacy not in (True, False):
        raise ValueError(f"unknown Hadamard variant {legacy!r}; expected True, False or '0.2.1'")
    blocks = weight.contiguous().reshape(shape[0], -1, size)  # stride order changes the float sums
    return torch.matmul(blocks, h).reshape(shape)
