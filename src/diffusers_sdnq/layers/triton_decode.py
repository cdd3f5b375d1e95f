"""Fused decode kernels for CUDA (Triton): packed codes to the compute dtype in one pass.

The GPU analogue of :mod:`.native`. One kernel per storage unit layout, *generated* from the packing tables of
``format/packing.py`` (:data:`~diffusers_sdnq.format.packing.LAYOUTS`, plus plain bytes and 16-bit words), so
every integer width, every float code type and the native int8 / float8 / 16-bit weights are served by one kernel
family. For value ``v`` of a weight::

    code = OR of the segments of v's slot in its chunk     (the table's shifts and masks, unrolled)
    x    = code + qmin                                     integer codes: exact in float32
    x    = table[code]                                     float codes: the float32 value of every code
    w    = x * scale[g]          or   fma(x, scale[g], zero_point[g])     (or x*s + z: see below)
    w    = levels[g, code]                                 codebooks: the group's level table
    out  = w rounded once to the output dtype              (float32, bfloat16 or float16)

with ``g = v // group`` (or ``v % columns`` for weights stored transposed). This is the codec's order of
operations (``format/codec.py``: decode in float32, scale, zero point, round once), so the result is bit-identical
to :func:`~diffusers_sdnq.format.codec.dequantize`. Whether ``torch.addcmul`` fuses the multiply-add (one
rounding) depends on the device; before first use on a device a few values are decoded both ways and compared
with the torch codec there, and the variant that matches is kept (as the CPU decoder does). If neither matches, or
Triton is missing, or ``DIFFUSERS_SDNQ_TRITON=0``, the torch path runs: same numbers, more passes over memory.

Triton is optional (``pip install triton``; it comes with torch's CUDA wheels on Linux). With
``TRITON_INTERPRET=1`` the kernels run on CPU tensors through Triton's interpreter, which is how the tests prove
them on machines without a GPU (the interpreter rounds float32 and float16 like a GPU, bfloat16 stores not, so in
interpreter mode bfloat16 results are computed in float32 and rounded by torch).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..format.dtypes import QDType
from ..format.layout import LayerLayout
from ..format.packing import LAYOUTS, Segment

if TYPE_CHECKING:
    from .forward import Workspace

logger = logging.getLogger(__name__)

BLOCK = 1024
"""Values per Triton program (4 warps: 8 consecutive values per thread, stored as one vector)."""

_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def enabled_by_env() -> bool:
    return os.environ.get("DIFFUSERS_SDNQ_TRITON", "1").strip().lower() not in ("0", "false", "no", "off")


def interpreting() -> bool:
    """Triton's CPU interpreter is on (``TRITON_INTERPRET=1``): kernels take CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


@functools.cache
def _triton():
    try:
        import triton
        import triton.language as tl
    except Exception as exc:  # ImportError, or a broken install (missing libraries)
        logger.debug("diffusers-sdnq: Triton unavailable (%s); CUDA layers decode with torch operations", exc)
        return None
    return triton, tl


def available() -> bool:
    """Triton can be imported and is not switched off."""
    return enabled_by_env() and _triton() is not None


# ---------------------------------------------------------------------------------------------------- code generation
@dataclass(frozen=True)
class UnitLayout:
    """How values sit in storage units: a chunk of ``values`` values in ``units`` units of ``unit_bits`` bits."""

    key: int
    """The packed width (LAYOUTS), 8 for one value per byte, 16 for one value per 16-bit word."""
    values: int
    units: int
    unit_bits: int
    segments: tuple[Segment, ...]


def unit_layouts() -> dict[int, UnitLayout]:
    """Every unit layout a kernel is generated for: the packed widths of LAYOUTS, plus bytes and 16-bit words."""
    out = {bits: UnitLayout(bits, lay.values_per_chunk, lay.units_per_chunk, lay.unit_bits, lay.segments)
           for bits, lay in LAYOUTS.items()}
    out[8] = UnitLayout(8, 1, 1, 8, ((0, 0, 8, 0, 0),))
    out[16] = UnitLayout(16, 1, 1, 16, ((0, 0, 16, 0, 0),))
    return out


_TAIL = '''
@triton.jit
def finish(code, v, offs, live, out, scale, zero, table, group, qmin, levels,
           HAS_ZERO: tl.constexpr, HAS_TABLE: tl.constexpr, CODEBOOK: tl.constexpr, FUSED: tl.constexpr,
           TRANSPOSED: tl.constexpr):
    if TRANSPOSED:
        g = v % group
    else:
        g = v // group
    if CODEBOOK:
        w = tl.load(scale + g * levels + code + qmin, mask=live, other=0.0)
    else:
        if HAS_TABLE:
            x = tl.load(table + code, mask=live, other=0.0)
        else:
            x = (code + qmin).to(tl.float32)
        s = tl.load(scale + g, mask=live, other=1.0)
        if HAS_ZERO:
            z = tl.load(zero + g, mask=live, other=0.0)
            if FUSED:
                w = tl.fma(x, s, z)
            else:
                w = x * s + z
        else:
            w = x * s
    tl.store(out + offs, w.to(out.dtype.element_ty), mask=live)
'''


def kernel_source(layout: UnitLayout) -> str:
    """Triton source of the decode kernel for one unit layout: the segment table unrolled into loads, shifts and
    masks (a masked-off lane loads nothing, so each value only reads the units its own segments name)."""
    name = f"decode_u{layout.key}"
    lines = [
        "@triton.jit",
        f"def {name}(units, out, scale, zero, table, first, count, group, qmin, levels, xor,",
        "        HAS_ZERO: tl.constexpr, HAS_TABLE: tl.constexpr, CODEBOOK: tl.constexpr, FUSED: tl.constexpr,",
        "        TRANSPOSED: tl.constexpr, WIDE: tl.constexpr, BLOCK: tl.constexpr):",
        "    pid = tl.program_id(0)",
        "    if WIDE:",
        "        pid = pid.to(tl.int64)",
        "    offs = pid * BLOCK + tl.arange(0, BLOCK)",
        "    live = offs < count",
        "    v = offs + first",
        f"    base = units + (v // {layout.values}) * {layout.units}",
        *([f"    slot = v % {layout.values}"] if layout.values > 1 else []),
        "    code = tl.full([BLOCK], 0, tl.int32)",
    ]
    for k, lo, n, u, pos in layout.segments:
        mask = f"live & (slot == {k})" if layout.values > 1 else "live"
        part = f"tl.load(base + {u}, mask={mask}, other=0).to(tl.int32)"
        if layout.unit_bits == 16:  # words are loaded as int16: drop the sign extension
            part = f"({part} & 65535)"
        if pos:
            part = f"({part} >> {pos})"
        if pos + n < layout.unit_bits:
            part = f"({part} & {(1 << n) - 1})"
        if lo:
            part = f"({part} << {lo})"
        lines.append(f"    code = code | {part}")
    lines += [
        "    code = code ^ xor",
        "    finish(code, v, offs, live, out, scale, zero, table, group, qmin, levels,",
        "           HAS_ZERO, HAS_TABLE, CODEBOOK, FUSED, TRANSPOSED)",
    ]
    return "\n".join(lines) + "\n"


def module_source() -> str:
    """The whole generated module: the shared tail and one kernel per unit layout."""
    return "\n\n".join([_TAIL.strip() + "\n", *(kernel_source(lay) for lay in unit_layouts().values())])


GENERATED = Path(__file__).with_name("triton_kernels.py")
"""The generated kernels, shipped with the package. Triton reads a kernel's source from its file, so the kernels
must live in one; a file in the package (not one written at run time into a cache that others might write to)
is as trusted as this module. ``tests/test_triton_decode.py`` checks that it equals :func:`generated_source`;
rewrite it after changing the tables or the template with ``python -m diffusers_sdnq.layers.triton_decode``."""


def generated_source() -> str:
    """The text of :data:`GENERATED`: a header, the imports, and :func:`module_source`."""
    return ('"""Generated by diffusers_sdnq.layers.triton_decode.generated_source() from format/packing.py\'s tables: do '
            'not edit.\n\nRegenerate with ``python -m diffusers_sdnq.layers.triton_decode``; a test checks it is current.\n"""\n\n'
            "import triton\nimport triton.language as tl\n\n\n" + module_source())


@functools.cache
def _kernels(interpret: bool) -> dict[int, object]:
    """Import the generated kernels (compiled by Triton on their first launch). ``interpret`` keys the cache
    because ``triton.jit`` decides when the module is imported whether its kernels run on the GPU or in the
    interpreter; the kernels use only Triton builtins, so the interpreter works even when Triton was imported
    before ``TRITON_INTERPRET`` was set."""
    name = f"diffusers_sdnq_triton_kernels_{'interpreted' if interpret else 'compiled'}"
    spec = importlib.util.spec_from_file_location(name, GENERATED)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return {key: getattr(module, f"decode_u{key}") for key in unit_layouts()}


# ---------------------------------------------------------------------------------------------------------- planning
@dataclass(frozen=True)
class Plan:
    """What one layer's decode needs from its layout: the kernel, how codes become numbers, how values map to
    scale entries. Built once per layout (see :func:`plan`)."""

    key: int
    """Unit layout (:func:`unit_layouts`)."""
    unit_dtype: torch.dtype
    """dtype the stored tensor is viewed as (uint8 bytes or int16 words)."""
    qmin: int
    xor: int
    table: bool
    codebook: int
    """Levels per group of a codebook layout, 0 otherwise."""
    transposed: bool
    group: int
    """Values per scale entry, or the number of columns for weights stored transposed."""
    has_zero: bool
    numel: int
    code_shape: tuple[int, ...]
    """Shape of the decoded code tensor (the layout's quantized shape)."""


_NATIVE_TABLE = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
                                                  "float8_e5m2fnuz", "float8_e8m0fnu", "float16", "bfloat16")
                      if hasattr(torch, n))


def _codes(qdtype: QDType) -> tuple[int, torch.dtype, int, int, bool] | None:
    """(unit layout, unit view dtype, qmin, xor, table) for a weight type; None for types no kernel decodes."""
    if qdtype.kind == "native":
        dt = qdtype.torch_dtype
        size = torch.empty((), dtype=dt).element_size()
        if size not in (1, 2):
            return None
        key, view = (8, torch.uint8) if size == 1 else (16, torch.int16)
        if dt in _NATIVE_TABLE:
            return key, view, 0, 0, True
        if dt.is_signed:  # two's complement: flip the sign bit, then it is offset binary
            half = 1 << (8 * size - 1)
            return key, view, -half, half, False
        return key, view, 0, 0, False
    if qdtype.bits not in LAYOUTS and qdtype.bits not in (8, 16):
        return None
    view = torch.uint8 if qdtype.bits <= 8 else torch.int16
    if qdtype.kind == "float":
        return qdtype.bits, view, 0, 0, True
    return qdtype.bits, view, int(qdtype.qmin) if qdtype.signed else 0, 0, False


@functools.cache
def plan(layout: LayerLayout) -> Plan | None:
    """The kernel plan of a layout, or None when it needs the torch path (conv-shaped scales, Hadamard-only
    layouts are fine: the rotation runs after the decode, in torch)."""
    codes = _codes(layout.dtype)
    if codes is None:
        return None
    key, view, qmin, xor, table = codes
    qshape, sshape = tuple(layout.quantized_shape), tuple(layout.scale_shape)
    numel = math.prod(qshape)
    if key in LAYOUTS and numel % LAYOUTS[key].values_per_chunk:
        return None
    transposed = False
    levels = 0
    if layout.codebook:
        levels = 2**layout.dtype.bits
        if sshape == (levels,):  # one table for the whole tensor
            group = numel
        elif sshape[:-1] == qshape[:-1] and sshape[-1] == levels and len(qshape) >= 2:
            group = qshape[-1]
        else:
            return None
        if table:
            return None
    elif layout.transposed and len(qshape) == 2 and sshape == (1, qshape[1]) and qshape[1] > 1:
        transposed, group = True, qshape[1]
    else:
        # scale[i0, .., i(r-1), 1, .., 1] against codes of shape qshape: value v shares entry v // prod(qshape[r:])
        if len(sshape) != len(qshape):
            return None
        r = len(qshape)
        while r > 0 and sshape[r - 1] == 1:
            r -= 1
        if sshape[:r] != qshape[:r]:
            return None
        group = math.prod(qshape[r:])
    return Plan(key=key, unit_dtype=view, qmin=qmin, xor=xor, table=table, codebook=levels, transposed=transposed,
                group=group, has_zero=layout.has_zero_point, numel=numel, code_shape=qshape)


@functools.cache
def _table(qdtype: QDType, legacy: bool | str, device: torch.device) -> torch.Tensor:
    """float32 value of every code of a float type (mini-floats, float8, float16/bfloat16 weights), on ``device``."""
    if qdtype.kind == "native":
        bits = 8 * torch.empty((), dtype=qdtype.torch_dtype).element_size()
        codes = torch.arange(2**bits, dtype=torch.int32)
        codes = codes.to(torch.uint8) if bits == 8 else codes.to(torch.int16)  # wraps to the bit patterns
        values = codes.view(qdtype.torch_dtype).to(torch.float32)
    else:
        from . import native

        values = native.float_table(qdtype, legacy)
    return values.contiguous().to(device)


# ---------------------------------------------------------------------------------------------------------- decoding
class TritonDecoder:
    """The kernels for one device, with the multiply-add rounding that matches torch there."""

    def __init__(self, fused: bool, interpret: bool):
        self.fused = fused
        self.interpret = interpret
        self.kernels = _kernels(interpret)

    def decode(self, p: Plan, layout: LayerLayout, units: torch.Tensor, scale: torch.Tensor,
               zero_point: torch.Tensor | None, out: torch.Tensor, first: int = 0, count: int | None = None) -> None:
        """Decode values ``[first, first + count)`` of the layer (in code-tensor order) into ``out``.

        ``units``: the stored weight, contiguous; ``scale`` / ``zero_point``: float32, contiguous (the codebook's
        level table for codebook layouts); ``out``: contiguous float32, bfloat16 or float16 with ``count``
        elements. Sizes were checked by :func:`check` (or the caller)."""
        count = p.numel - first if count is None else count
        if count <= 0:
            return
        if self.interpret and out.dtype == torch.bfloat16:  # the interpreter does not round bf16 stores
            tmp = torch.empty(count, dtype=torch.float32, device=out.device)
            self.decode(p, layout, units, scale, zero_point, tmp, first, count)
            out.view(-1)[:count].copy_(tmp)
            return
        if units.dtype != p.unit_dtype:
            units = units.view(p.unit_dtype) if units.element_size() == p.unit_dtype.itemsize else \
                units.to(torch.uint8)  # uint1 bytes stored as int64 values
        table = _table(layout.dtype, layout.legacy_float_subnormals, out.device) if p.table else scale
        zero = zero_point if zero_point is not None else scale
        wide = first + count >= 2**31 - BLOCK or p.numel >= 2**31 - BLOCK
        grid = (-(-count // BLOCK),)
        kernel = self.kernels[p.key]
        extra = {} if self.fused or self.interpret else {"enable_fp_fusion": False}
        kernel[grid](units, out, scale, zero, table, first, count, p.group, p.qmin, p.codebook, p.xor,
                     HAS_ZERO=p.has_zero, HAS_TABLE=p.table, CODEBOOK=p.codebook > 0, FUSED=self.fused,
                     TRANSPOSED=p.transposed, WIDE=wide, BLOCK=BLOCK, num_warps=4, **extra)


def check(p: Plan, units: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None) -> bool:
    """Whether these tensors are what the plan's kernel reads: contiguous, on one device, float32 companions of
    the expected sizes, codes occupying exactly the expected units."""
    if not units.is_contiguous() or units.device != scale.device:
        return False
    per_unit = {torch.uint8: 1, torch.int16: 2}[p.unit_dtype]
    if units.dtype == torch.int64 and p.key == 1:
        units_needed = p.numel // 8
    elif units.element_size() != per_unit:
        return False
    elif p.key in LAYOUTS:
        lay = LAYOUTS[p.key]
        units_needed = p.numel // lay.values_per_chunk * lay.units_per_chunk
    else:
        units_needed = p.numel
    if units.numel() != units_needed:
        return False
    entries = (p.numel // p.group if not p.transposed else p.group) * max(p.codebook, 1)
    for t in (scale, zero_point):
        if t is None:
            continue
        if t.dtype != torch.float32 or not t.is_contiguous() or t.numel() != entries or t.device != units.device:
            return False
    return p.has_zero == (zero_point is not None)


_LOCK = threading.Lock()
_STATE: dict[tuple[str, int | None, bool], TritonDecoder | None] = {}


def get(device: torch.device | str) -> TritonDecoder | None:
    """The self-checked kernels for ``device`` (CUDA, or CPU under the interpreter); None where they must not run.

    Decided once per device: the first call decodes a uint4 layer with a zero point (the multiply-add whose
    rounding differs between devices) and an int8 one, fused and unfused, and keeps the variant that equals
    the torch codec there."""
    device = torch.device(device)
    interpret = interpreting()
    if not available() or (device.type != "cuda" and not (interpret and device.type == "cpu")):
        return None
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (device.type, device.index, interpret)
    if key in _STATE:
        return _STATE[key]
    with _LOCK:
        if key not in _STATE:
            _STATE[key] = _choose(device, interpret)
        return _STATE[key]


def _choose(device: torch.device, interpret: bool) -> TritonDecoder | None:
    from ..format import codec, plan_layer
    from ..format.config import QuantConfig
    from ..quantize.weight import quantize_weight

    cases = []
    gen = torch.Generator().manual_seed(0)
    for name in ("uint4", "int8"):
        cfg = QuantConfig.from_dict({"quant_method": "sdnq", "weights_dtype": name, "group_size": 32,
                                     "sdnq_version": "0.2.8"})
        layout = plan_layer("linear", (64, 256), cfg.options_for("check.weight", "linear"))
        tensors = quantize_weight(torch.randn(64, 256, generator=gen), layout)
        cases.append((layout, {k: v.to(device) for k, v in tensors.items()}))
    for fused in (True, False):
        try:
            decoder = TritonDecoder(fused, interpret)
            ok = True
            for layout, tensors in cases:
                p = plan(layout)
                expected = codec.dequantize(layout, tensors, torch.float32)
                out = torch.empty(p.numel, dtype=torch.float32, device=device)
                decoder.decode(p, layout, tensors["weight"], tensors["scale"], tensors.get("zero_point"), out)
                ok = ok and torch.equal(out.view(expected.shape), expected)
        except Exception as exc:  # a Triton that cannot compile for this device, a driver problem, ...
            logger.debug("diffusers-sdnq: Triton decode kernels unavailable on %s (%s)", device, exc)
            return None
        if ok:
            return decoder
        logger.debug("diffusers-sdnq: Triton decode (fused=%s) differs from torch on %s", fused, device)
    return None


def dequantize(layout: LayerLayout, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype, *, svd: bool = True,
               workspace: Workspace | None = None) -> torch.Tensor | None:
    """The layer's dense weight through the kernels, bit-identical to ``codec.dequantize(layout, tensors, dtype)``
    (``svd=False``: without the SVD product); None when this layout or storage is not one they decode (the caller
    then uses the torch path). With a ``workspace`` (:class:`.forward.Workspace`) the decoded weight is written into
    its buffer and valid until the next call with that workspace; else it is a new tensor."""
    from ..format import codec, hadamard

    weight = tensors.get("weight")
    if weight is None or dtype not in _OUT_DTYPES:
        return None
    p = plan(layout)
    decoder = get(weight.device) if p is not None else None
    if decoder is None:
        return None
    scale = codec._dequantize_companion(tensors, "scale", layout.scale_qdtype, layout.scale_shape,
                                        layout.codebook_scale, "scale_2", "scale_zero_point",
                                        layout.legacy_float_subnormals)
    zero = None
    if layout.has_zero_point:
        if "zero_point" not in tensors:
            return None
        zero = codec._dequantize_companion(tensors, "zero_point", layout.zero_point_qdtype, layout.scale_shape,
                                           layout.codebook_scale, "zero_point_scale", "zero_point_2",
                                           layout.legacy_float_subnormals)
    if not check(p, weight, scale, zero):
        return None
    svd_added = svd and layout.svd_rank
    direct = not svd_added and not layout.hadamard_size  # nothing left to add in float32: round once, here
    work_dtype = dtype if direct else torch.float32
    if workspace is not None:
        buf = workspace.get("dense", p.numel, work_dtype, weight.device)
    else:
        buf = torch.empty(p.numel, dtype=work_dtype, device=weight.device)
    decoder.decode(p, layout, weight, scale, zero, buf)
    w = buf.view(p.code_shape)
    if layout.transposed:
        w = w.t()
    w = w.reshape(layout.weight_shape)
    if svd_added:
        up, down = tensors["svd_up"], tensors["svd_down"]
        if layout.svd_transposed:
            up, down = up.t().contiguous(), down.t().contiguous()
        if w.ndim > 2:
            w = w + torch.mm(up, down).reshape(layout.weight_shape)
        else:
            w = w.to(up.dtype).addmm_(up, down)
    w = w.to(dtype)
    if layout.hadamard_size:
        w = hadamard.rotate(w, layout.hadamard_size, legacy=layout.hadamard_legacy)
    return w


if __name__ == "__main__":  # regenerate the shipped kernels after changing the packing tables or the template
    GENERATED.write_text(generated_source(), encoding="utf-8")
    print(f"wrote {GENERATED}")
