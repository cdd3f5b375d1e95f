"""SDNQ's packed mini-floats (``float{N}_e{E}m{M}fn`` / ``fnu``): codes ↔ float32.

Codes are sign | exponent | mantissa, MSB first, with the IEEE bias ``2**(E-1) - 1`` and no inf/NaN. Every
value is exactly representable in float32 (E ≤ 5, M ≤ 15), so decoding is exact arithmetic and any correct
implementation matches the reference bit for bit.
"""

from __future__ import annotations

import torch

from .dtypes import QDType

FLOAT_READINGS = ("0.1.3", "0.1.6")
"""Older readings of the codes (named by the first sdnq release that used them); ``False`` is the current one."""


def decode(codes: torch.Tensor, qdtype: QDType, *, legacy_subnormals: bool | str = False) -> torch.Tensor:
    """Decode integer codes of a custom float type to float32.

    ``legacy_subnormals`` selects how the writing release read exponent code 0 (measured, see
    ``docs/format-history.md``). ``False``: sdnq >= 0.2.2, an IEEE subnormal ``2**(1-bias) * m/2**M``. Otherwise
    exponent code 0 with a nonzero mantissa is a *normal* number ``2**-bias * (1 + m/2**M)``, and the codes with
    exponent and mantissa 0 read as: ``"0.1.3"`` (sdnq 0.1.3-0.1.5) 0 for the all-zero code, ``-2**-bias`` for
    the sign-only one; ``"0.1.6"`` or ``True`` (sdnq 0.1.6-0.2.1) 0 for both, except that types with one
    exponent bit (bias 0) have no zero at all: those codes read as +1 and -1.
    """
    if legacy_subnormals and legacy_subnormals is not True and legacy_subnormals not in FLOAT_READINGS:
        raise ValueError(f"unknown custom-float reading {legacy_subnormals!r}; expected one of {FLOAT_READINGS}")
    exp_bits, man_bits = qdtype.exponent_bits, qdtype.mantissa_bits
    bias = 2 ** (exp_bits - 1) - 1
    codes = codes.to(torch.int32)
    man = (codes & ((1 << man_bits) - 1)).to(torch.float32)
    exp = (codes >> man_bits) & ((1 << exp_bits) - 1)
    frac = man / float(2**man_bits)
    normal = torch.ldexp(1.0 + frac, (exp - bias).to(torch.float32))
    negative = ((codes >> (exp_bits + man_bits)) & 1).bool() if qdtype.signed else None
    if legacy_subnormals:
        sub = torch.ldexp(1.0 + frac, torch.tensor(-float(bias)))
        if legacy_subnormals == "0.1.3":
            zero = codes == 0  # the sign-only code keeps its normal reading, -2**-bias
        elif exp_bits > 1:
            zero = man == 0
        else:
            zero = torch.zeros_like(man, dtype=torch.bool)
        sub = torch.where(zero, torch.zeros_like(frac), sub)
    else:
        sub = torch.ldexp(frac, torch.tensor(float(1 - bias)))
    value = torch.where(exp == 0, sub, normal)
    if negative is not None:
        value = torch.where(negative, -value, value)
        value = torch.where(value == 0, torch.zeros_like(value), value)  # a negative zero reads as +0
    return value


def encode(values: torch.Tensor, qdtype: QDType) -> torch.Tensor:
    """Encode float values (already scaled into the type's range) to int32 codes, round to nearest.

    Values are clamped to ``[qmin, qmax]``. Ties round away from zero in magnitude. Subnormals are produced.
    """
    exp_bits, man_bits = qdtype.exponent_bits, qdtype.mantissa_bits
    bias = 2 ** (exp_bits - 1) - 1
    x = values.to(torch.float32).clamp(qdtype.qmin, qdtype.qmax)
    negative = x < 0
    mag = x.abs()
    # Binade of each value, limited to the normal range; below it the subnormal step applies.
    _, e2 = torch.frexp(mag)  # mag = f * 2**e2 with f in [0.5, 1)
    e_unbiased = (e2 - 1).clamp(min=1 - bias)
    step = torch.ldexp(torch.ones_like(mag), (e_unbiased - man_bits).to(torch.float32))
    q = torch.floor(mag / step + 0.5)  # mantissa including the implicit bit, in units of step
    # Rounding up may carry into the next binade.
    carry = q >= 2 ** (man_bits + 1)
    q = torch.where(carry, q / 2, q)
    e_unbiased = torch.where(carry, e_unbiased + 1, e_unbiased)
    q = q.to(torch.int32)
    is_normal = q >= 2**man_bits
    exp_code = torch.where(is_normal, e_unbiased + bias, torch.zeros_like(e_unbiased))
    man_code = torch.where(is_normal, q - 2**man_bits, q)
    top_exp = 2**exp_bits - 1
    overflow = exp_code > top_exp
    exp_code = torch.where(overflow, torch.full_like(exp_code, top_exp), exp_code)
    man_code = torch.where(overflow, torch.full_like(man_code, 2**man_bits - 1), man_code)
    codes = (exp_code << man_bits) | man_code
    if qdtype.signed:
        codes = codes | (negative & (codes != 0)).to(torch.int32) << (exp_bits + man_bits)
    return codes
