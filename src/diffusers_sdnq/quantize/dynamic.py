"""Dynamic quantization: per layer, the first weight type (from the configured one upward) that is good enough.

Measured on the reference (sdnq 0.2.8) black-box, and reproduced here so both write the same choices:

* The loss of a candidate is the mean squared reconstruction error divided by the variance of the dense weight
  (``relative_variance_error``). A candidate is accepted when its loss is below the threshold.
* The default threshold (``dynamic_loss_threshold=None``) is ``10 ** (-bits / 2)`` for the configured type's
  width: 1e-2 for 4 bits, 1e-4 for 8 bits.
* Candidates are tried in a fixed order, starting at the configured type and never going narrower: per width,
  the signed types (integer, then torch's float8 types at width 8 / float16 and bfloat16 at width 16, then SDNQ
  floats by exponent size 2..5), then the unsigned ones (integer, then unsigned floats by exponent size 2..5).
  Widths run up to 16 bits; a layer no candidate fits stays dense.
* The choice is recorded as ``modules_dtype_dict[chosen] += [<layer>.weight]``, the configured type included.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import torch

from ..format.dtypes import DTYPES, QDType, get_dtype

MAX_BITS = 16
_NATIVE_SIGNED = {8: ("float8_e4m3fn", "float8_e5m2"), 16: ("float16", "bfloat16")}


def _width(bits: int) -> list[str]:
    names: list[str] = [f"int{bits}"] if bits > 1 else []
    names += [n for n in _NATIVE_SIGNED.get(bits, ())]
    names += [f"float{bits}_e{e}m{bits - 1 - e}fn" for e in range(2, 6) if bits - 1 - e >= 0]
    names.append(f"uint{bits}")
    names += [f"float{bits}_e{e}m{bits - e}fnu" for e in range(2, 6) if bits - e >= 0]
    names = ["float8_e4m3fn_sdnq" if n == "float8_e4m3fn" and i > 1 else n for i, n in enumerate(names)]
    return [n for n in names if n in DTYPES]


@cache
def candidate_order() -> tuple[str, ...]:
    """Every type dynamic quantization may pick, in the order it tries them."""
    return tuple(name for bits in range(1, MAX_BITS + 1) for name in _width(bits))


def candidates(start: str) -> list[str]:
    """The configured type, then every type after it in :func:`candidate_order` (all wider ones if it is absent)."""
    first = get_dtype(start).name
    order = candidate_order()
    if first in order:
        return list(order[order.index(first):])
    bits = get_dtype(start).bits
    return [first, *(n for n in order if DTYPES[n].bits > bits)]


def default_threshold(start: QDType) -> float:
    """``dynamic_loss_threshold=None``: 10 ** (-bits / 2) of the configured type."""
    return 10.0 ** (-start.bits / 2)


def relative_variance_error(dense: torch.Tensor, approx: torch.Tensor) -> float:
    """Mean squared error of ``approx`` over the variance of ``dense`` (float32, as the reference computes it)."""
    d = dense.detach().to(torch.float32)
    err = (approx.detach().to(torch.float32) - d).pow(2).mean()
    var = d.var() if d.numel() > 1 else d.new_zeros(())
    if float(var) <= 0:
        return 0.0 if float(err) == 0 else float("inf")
    return float(err / var)


def choose(start: str, threshold: float | None, loss_of: Callable[[str], float | None]) -> tuple[str | None, float]:
    """Walk the candidates from ``start``; return (first type whose loss is below the threshold, its loss).

    ``loss_of(name)`` quantizes with that type and returns the loss, or None when the type cannot hold the layer
    (it is then passed over). Returns (None, last loss) when no candidate is good enough.
    """
    limit = default_threshold(get_dtype(start)) if threshold is None else float(threshold)
    last = float("inf")
    for name in candidates(start):
        loss = loss_of(name)
        if loss is None:
            continue
        last = loss
        if loss < limit:
            return name, loss
    return None, last
