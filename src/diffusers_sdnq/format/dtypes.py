"""The table of every weight dtype an SDNQ checkpoint can name.

One frozen :class:`QDType` per name, built from rules rather than typed out, so the table cannot drift
from the encoding it describes. Everything else in the codec looks types up here: bit width, signedness,
the value range used for scaling, and how the codes sit on disk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from .errors import SDNQDtypeError

Kind = Literal["int", "float", "native"]
"""``int``: integer codes (offset binary when signed); ``float``: SDNQ's own packed mini-floats;
``native``: a torch dtype stored as is (int8, float8_e4m3fn, bfloat16, ...)."""


@dataclass(frozen=True)
class QDType:
    """One stored weight type.

    ``qmin``/``qmax`` are the range the quantizer scales into (for uint9..uint15 the reference uses
    ``2**bits`` as the maximum, one more than fits; we keep that so scales computed from it match).
    """

    name: str
    bits: int
    kind: Kind
    signed: bool
    qmin: float
    qmax: float
    exponent_bits: int = 0
    mantissa_bits: int = 0
    torch_dtype: torch.dtype | None = None
    """For ``native`` types: the torch dtype the tensor is stored in."""

    @property
    def is_integer(self) -> bool:
        if self.kind == "native":
            return not self.torch_dtype.is_floating_point
        return self.kind == "int"

    @property
    def is_float(self) -> bool:
        return not self.is_integer

    @property
    def unsigned(self) -> bool:
        return not self.signed

    @property
    def packed(self) -> bool:
        """True when codes go through the bit packer (or are stored as raw code words)."""
        return self.kind != "native"

    @property
    def needs_zero_point(self) -> bool:
        """Asymmetric quantization: every unsigned type stores a float offset (``zero_point``)."""
        return self.unsigned

    @property
    def storage_dtype(self) -> torch.dtype:
        """dtype of the tensor written to disk (before any reference quirks, see :mod:`packing`)."""
        if self.kind == "native":
            return self.torch_dtype
        if self.bits in (8,):
            return torch.uint8
        if self.bits == 16:
            return torch.uint16 if self.kind == "float" else (torch.int16 if self.signed else torch.uint16)
        return torch.uint8 if self.bits < 8 else torch.int16


def _custom_float_max(exponent_bits: int, mantissa_bits: int) -> float:
    # "fn" types have no inf/nan: the all-ones exponent is an ordinary finite binade.
    bias = 2 ** (exponent_bits - 1) - 1
    return 2.0 ** (2**exponent_bits - 1 - bias) * (2.0 - 2.0**-mantissa_bits)


def _build_table() -> dict[str, QDType]:
    table: dict[str, QDType] = {}

    def add(dt: QDType) -> None:
        assert dt.name not in table, dt.name
        table[dt.name] = dt

    # Integers. 8/16/32-bit ones are native torch tensors; every other width is packed.
    for bits in range(1, 17):
        for signed in (True, False):
            name = f"{'int' if signed else 'uint'}{bits}"
            if signed and bits == 1:
                continue  # int1 is an alias of uint1
            qmin = -(2 ** (bits - 1)) if signed else 0
            qmax = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
            if not signed and 9 <= bits <= 15:
                qmax = 2**bits  # the reference's off-by-one; kept so scales agree (docs/format-spec.md §4.1)
            if bits in (8, 16):
                tdt = {(8, True): torch.int8, (8, False): torch.uint8, (16, True): torch.int16, (16, False): torch.uint16}
                add(QDType(name, bits, "native", signed, qmin, qmax, torch_dtype=tdt[bits, signed]))
            else:
                add(QDType(name, bits, "int", signed, qmin, qmax))
    add(QDType("int32", 32, "native", True, -(2**31), 2**31 - 1, torch_dtype=torch.int32))
    add(QDType("uint32", 32, "native", False, 0, 2**32 - 1, torch_dtype=torch.uint32))

    # SDNQ's packed mini-floats: signed "fn" (1+E+M bits) and unsigned "fnu" (E+M bits).
    for bits in range(1, 17):
        for exp in range(1, 6):
            for signed in (True, False):
                man = bits - exp - (1 if signed else 0)
                if man < 0:
                    continue
                name = f"float{bits}_e{exp}m{man}{'fn' if signed else 'fnu'}"
                if name == "float8_e4m3fn":
                    name = "float8_e4m3fn_sdnq"  # torch owns the plain name (max 448, has NaN)
                top = _custom_float_max(exp, man)
                add(QDType(name, bits, "float", signed, -top if signed else 0.0, top, exp, man))

    # Floats torch stores natively.
    natives = {
        "float32": (torch.float32, 8, 23),
        "bfloat16": (torch.bfloat16, 8, 7),
        "float16": (torch.float16, 5, 10),
        "float8_e4m3fn": (torch.float8_e4m3fn, 4, 3),
        "float8_e5m2": (torch.float8_e5m2, 5, 2),
    }
    for opt_name, exp_man in (("float8_e4m3fnuz", (4, 3)), ("float8_e5m2fnuz", (5, 2)), ("float8_e8m0fnu", (8, 0))):
        if hasattr(torch, opt_name):
            natives[opt_name] = (getattr(torch, opt_name), *exp_man)
    for name, (tdt, exp, man) in natives.items():
        # Ranges to six significant digits, as the reference tabulates them (they set the scale of
        # float32/bfloat16/e8m0 weights). The reference also treats float8_e8m0fnu as signed.
        top = float(f"{torch.finfo(tdt).max:.5e}")
        add(QDType(name, torch.finfo(tdt).bits, "native", True, -top, top, exp, man, torch_dtype=tdt))
    return table


DTYPES: dict[str, QDType] = _build_table()
"""Every canonical dtype name → :class:`QDType`."""

ALIASES: dict[str, str] = {
    "int1": "uint1",
    "bool": "uint1",
    "fp32": "float32",
    "bf16": "bfloat16",
    "fp16": "float16",
    "fp8": "float8_e4m3fn",
    "fp1": "float1_e1m0fnu",
    **{f"fp{n}": f"float{n}_e{e}m{n - 1 - e}fn" for n, e in ((15, 5), (14, 5), (13, 5), (12, 5), (11, 5), (10, 5))},
    "fp9": "float9_e4m4fn",
    "fp7": "float7_e3m3fn",
    "fp6": "float6_e3m2fn",
    "fp5": "float5_e2m2fn",
    "fp4": "float4_e2m1fn",
    "fp3": "float3_e1m1fn",
    "fp2": "float2_e1m0fn",
    "ufp16": "float16_e5m11fnu",
    **{f"ufp{n}": f"float{n}_e5m{n - 5}fnu" for n in range(10, 16)},
    "ufp9": "float9_e4m5fnu",
    "ufp8": "float8_e4m4fnu",
    "ufp7": "float7_e3m4fnu",
    "ufp6": "float6_e3m3fnu",
    "ufp5": "float5_e2m3fnu",
    "ufp4": "float4_e2m2fnu",
    "ufp3": "float3_e1m2fnu",
    "ufp2": "float2_e1m1fnu",
    "ufp1": "float1_e1m0fnu",
}

MATMUL_DTYPES = frozenset({"int8", "uint8", "fp8", "fp16", "float8_e4m3fn", "float16"})
"""Values the format accepts for ``quantized_matmul_dtype``."""

# Self-check at import: every alias points at a real entry (the torchao habit of asserting tables agree).
assert all(target in DTYPES for target in ALIASES.values()), [a for a, t in ALIASES.items() if t not in DTYPES]


def canonical_name(name: str) -> str:
    """Resolve an alias (``fp8``, ``bool``, ``ufp4`` ...) to the table's canonical name."""
    return ALIASES.get(name, name)


def get_dtype(name: str, *, what: str = "weights_dtype") -> QDType:
    """Look a dtype up by name or alias, with an error that lists what is accepted."""
    if not isinstance(name, str):
        raise SDNQDtypeError(f"{what} must be a dtype name string, got {name!r} ({type(name).__name__})")
    key = canonical_name(name.strip().lower()) if name.strip().lower() in ALIASES else name.strip()
    try:
        return DTYPES[key]
    except KeyError:
        close = sorted(n for n in (*DTYPES, *ALIASES) if n.startswith(key[:4]))[:8]
        hint = f" Similar names: {', '.join(close)}." if close else ""
        raise SDNQDtypeError(
            f"Unknown SDNQ {what} {name!r}: expected one of the {len(DTYPES)} names in "
            f"diffusers_sdnq.format.DTYPES (or an alias such as 'fp8', 'uint4', 'int5').{hint}"
        ) from None


def all_dtype_names(include_aliases: bool = True) -> list[str]:
    """Every accepted name, sorted; aliases included unless asked otherwise."""
    names = set(DTYPES)
    if include_aliases:
        names |= set(ALIASES)
    return sorted(names)
