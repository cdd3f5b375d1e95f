"""Quantized matmul: activations quantized per token and multiplied with the weight's int8 or fp8 codes.

Checkpoints written with ``use_quantized_matmul=True`` expect this forward: instead of rebuilding a float weight,
each row of the flattened input is quantized on the fly and multiplied with integer (or fp8) codes, the product
accumulated in int32 (or in the float16 product described below) and scaled back in float. The reference
library's numerics were measured as a black box (docs/format-notes.md, "Quantized matmul"); this module repeats
them operation for operation, so that outputs equal the reference's bit for bit on the same machine:

* **When.** Linear layers (and convolutions saved with ``use_quantized_matmul_conv``) whose weight is at least
  32 x 32 with both dimensions multiples of 16, not excluded by ``modules_to_not_use_matmul``. A linear with
  fewer than 32 input rows uses the dequantize path; convolutions always use the matmul.
* **Activations**, per row: symmetric int8 (``amax/127``), asymmetric 8-bit for a ``uint8`` matmul
  (``(max-min)/255``, an offset that makes the codes int8), or fp8 e4m3 / float16 (``amax`` over the type's
  maximum) for float matmuls. They are quantized in the weight scale's dtype (float32 unless the checkpoint was
  written with ``dequantize_fp32=False``).
* **Weights.** Row-wise 8-bit codes are used as stored (``uint8`` shifted by 128 into int8, with the zero point
  moved accordingly); row-wise packed codes (``int6``, ``uint4`` with ``group_size=-1``, ...) are unpacked and
  used with their own scales; grouped, double-quantized or codebook weights are dequantized and re-quantized
  per output row to int8 (or fp8) - per call, as the reference does, or once with ``quantized_matmul_cache``.
* **Zero points** become a bias from the activations' row sums; the **SVD** correction is a float branch
  ``(x @ down) @ up`` added in place of the bias.
* **fp8 on CPU.** The reference multiplies fp8 (and float16) codes on CPUs as float16 matrices scaled by
  ``1/sqrt(P*K)`` (``P`` = 4 for e4m3, 65536 for e5m2 and float16 codes) to stay in float16's range, and scales
  the float16 product back; it is done the same way here (on CUDA: ``torch._scaled_mm``).

Speed. On CPUs with oneDNN (x86 builds of torch), int8 products run through oneDNN's int8 matmul on a weight
packed once for it (AMX / VNNI kernels: ~2-3x faster than ``torch._int_mm``); the integer result is exact, so the
output is unchanged. The packed copy costs one byte per weight; when the original codes lie in the checkpoint's
memory map, their pages are handed back to the kernel (re-read from the file if anything needs them). Elsewhere
``torch._int_mm``, and without it an exact float64 product.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..format import codec, hadamard
from ..format.dtypes import QDType
from ..format.layout import LayerLayout, _default_matmul_dtype, _needs_requantize
from ..format.packing import LAYOUTS
from . import native

MIN_TOKENS = 32
"""Linear layers with fewer input rows than this use the dequantize path (the reference's threshold)."""

_FLOAT16_MAX = 65504.0


# ------------------------------------------------------------------------------------------------- eligibility
def matmul_qdtype(layout: LayerLayout) -> QDType:
    """The matmul type a layer uses: ``quantized_matmul_dtype`` or the default for its weight type."""
    return _default_matmul_dtype(layout.dtype, layout.options)


def requantizes(layout: LayerLayout) -> bool:
    """Whether the stored codes must be dequantized and re-quantized per output row for the matmul."""
    if layout.num_groups > 1 or layout.codebook or math.prod(layout.scale_shape) not in (1, layout.weight_shape[0]):
        return True  # several scales per output row (groups, or a convolution's per-kernel-position scales)
    return _needs_requantize(layout.dtype, matmul_qdtype(layout), layout.options)


def skip_reason(layer: nn.Module, switched_on: bool = False) -> str | None:
    """Why ``layer`` cannot use the quantized matmul (None when it can). ``switched_on``: the matmul was asked for
    after loading, not saved with the checkpoint."""
    layout: LayerLayout = layer.sdnq_layout
    if layout.kind not in ("linear", "conv"):
        return f"{type(layer).__name__} layers have no quantized matmul"
    out, flat_in = layout.weight_shape[0], math.prod(layout.weight_shape[1:])
    if out < 32 or flat_in < 32 or out % 16 or flat_in % 16:
        return f"weight {out} x {flat_in}: both dimensions must be at least 32 and multiples of 16"
    if layout.options.matmul_excluded_by:
        return f"excluded by the checkpoint's {layout.options.matmul_excluded_by}"
    if layout.hadamard_size and layout.svd_rank:
        return "Hadamard rotation together with SVD is not supported by the quantized matmul"
    if layout.kind == "conv":
        if layout.svd_rank:
            return "convolutions with SVD are not supported by the quantized matmul"
        if getattr(layer, "groups", 1) != 1 or isinstance(getattr(layer, "padding", 0), str):
            return "grouped convolutions and string padding are not supported by the quantized matmul"
    try:
        qd = matmul_qdtype(layout)
    except Exception as exc:  # an unknown quantized_matmul_dtype
        return str(exc)
    if qd.name not in ("int8", "uint8", "float8_e4m3fn", "float16"):
        return f"quantized_matmul_dtype {qd.name!r} is not one of int8, uint8, float8_e4m3fn, float16"
    if (switched_on and qd.name == "float8_e4m3fn" and not layout.options.use_quantized_matmul
            and layer.weight.device.type == "cpu"):
        # measured: the reference's apply_sdnq_options_to_model leaves fp8 / mini-float layers on the dequantize
        # path on CPU (checkpoints saved with the option do run its float16 emulation of the fp8 product)
        return "an fp8 matmul switched on after loading is not used on CPU (as in the reference)"
    return None


def eligible(layer: nn.Module, switched_on: bool = False) -> bool:
    """``skip_reason(layer, switched_on) is None``, cached per layout and device."""
    key = (id(layer.sdnq_layout), switched_on, layer.weight.device.type)
    cached = layer.__dict__.get("_sdnq_qmm_eligible")
    if cached is None or cached[0] != key:
        cached = (key, skip_reason(layer, switched_on) is None)
        layer.__dict__["_sdnq_qmm_eligible"] = cached
    return cached[1]


# ------------------------------------------------------------------------------------------------- weights
@dataclasses.dataclass
class MatmulWeight:
    """One layer's weight in the form the quantized matmul uses (what the reference holds, with the same values).

    ``codes`` is (in, out), as the reference keeps it (a transposed view when the file stores (out, in)); int8 for
    integer matmuls, float8 / float16 for float ones. ``scale``/``zero_point`` are (1, out) or (1, 1)."""

    integer: bool
    asymmetric: bool
    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None = None
    code_sums: torch.Tensor | None = None
    """Asymmetric activations: per output, the codes' sum times the scale."""
    activation_dtype: torch.dtype | None = None
    """Float matmuls: the activations' code type (float8_e4m3fn or float16)."""
    product_scale: float = 1.0
    """Float matmuls: ``P`` in the float16 product's scaling ``1/sqrt(P*K)``."""
    svd: tuple[torch.Tensor, torch.Tensor] | None = None
    """(down (in, rank), up (rank, out)), contiguous, in the factors' dtype."""
    packed: torch.Tensor | None = None
    """The int8 codes packed for oneDNN (CPU), when made."""
    owns_memory: bool = False
    """``codes`` is a new tensor (decoded, re-quantized, shifted), not a view of the stored weight."""
    pack_later: bool = False
    """Pack for oneDNN once the unpacked products have taken as long as packing would (see :func:`weight_for`)."""
    unpacked_seconds: float = 0.0
    source: torch.Tensor | None = None
    """The stored codes, whose mapped pages are released after packing."""


def _row(t: torch.Tensor, out: int) -> torch.Tensor:
    """A per-output companion as (1, out) (or (1, 1) when tensor-wise)."""
    return t.reshape(1, -1) if t.numel() == out else t.reshape(1, 1)


def _dense_without_extras(layout: LayerLayout, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The dequantized weight (out, in...) in the scale's dtype, without SVD and without un-rotating a Hadamard
    rotation: what the reference re-quantizes."""
    plain = dataclasses.replace(layout, svd_rank=0, hadamard_size=0)
    from .forward import RowDecoder, row_alignment  # local: forward imports this module

    if row_alignment(plain) is not None and tensors["weight"].device.type == "cpu":
        decoder = RowDecoder(plain, tensors)
        if decoder.native is not None and decoder.scale.dtype == torch.float32:
            return decoder.rows(0, plain.weight_shape[0], torch.float32, svd=False)
    return codec.dequantize(plain, {k: v for k, v in tensors.items() if not k.startswith("svd_")})


def _requantize_natively(layout: LayerLayout, tensors: Mapping[str, torch.Tensor]
                         ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Decode and re-quantize to int8 in one compiled pass (the same bits as the torch operations; CPU only)."""
    helpers = native.qmm_helpers() if tensors["weight"].device.type == "cpu" else None
    if helpers is None:
        return None
    from .forward import RowDecoder, row_alignment  # local: forward imports this module

    plain = dataclasses.replace(layout, svd_rank=0, hadamard_size=0)
    if row_alignment(plain) is None:
        return None
    decoder = RowDecoder(plain, tensors)
    if decoder.native is None or decoder.per_row % (LAYOUTS[plain.dtype.bits].values_per_chunk
                                                    if plain.dtype.bits in LAYOUTS else 1):
        return None
    zero_point = decoder.zero_point.reshape(-1) if decoder.zero_point is not None else None
    return helpers.requantize_rows(decoder.units.reshape(-1), plain.dtype, decoder.rows_total, decoder.per_row,
                                   decoder.scale.reshape(-1), zero_point, decoder.group, decoder.lut)


def _float_product_scale(dtype: torch.dtype) -> float:
    """``P`` for float codes of ``dtype``: the power of two that keeps ``K`` products of its largest values within
    float16's range after the ``1/sqrt(P*K)`` scaling (4 for e4m3, 65536 for e5m2 and float16)."""
    top = torch.finfo(dtype).max
    return float(2 ** math.ceil(math.log2(top * top / _FLOAT16_MAX)))


def prepare(layer: nn.Module) -> MatmulWeight:
    """Build the layer's :class:`MatmulWeight` from its stored tensors (no caching here)."""
    layout: LayerLayout = layer.sdnq_layout
    tensors = layer.sdnq_tensors()
    out = layout.weight_shape[0]
    mm = matmul_qdtype(layout)
    integer = mm.is_integer
    weight = tensors["weight"]
    owns = False
    zero_point = None
    requantized = _requantize_natively(layout, tensors) if requantizes(layout) and integer else None
    if requantized is not None:
        codes, scale = requantized
        codes, scale, owns = codes.t(), scale.t(), True
    elif requantizes(layout):
        dense = _dense_without_extras(layout, tensors).reshape(out, -1)
        top = 127.0 if integer else torch.finfo(mm.torch_dtype).max
        scale = dense.abs().amax(-1, keepdim=True).div_(top)
        q = dense.div_(scale)
        if integer:
            codes = q.round_().clamp_(-128, 127).to(torch.int8)
        else:
            codes = q.nan_to_num_().clamp_(-top, top).to(mm.torch_dtype)
        codes, scale, owns = codes.t(), scale.t(), True
    else:
        scale = _row(tensors["scale"], out)
        if layout.has_zero_point:
            zero_point = _row(tensors["zero_point"], out)
        dt = layout.dtype
        if dt.kind == "native":
            codes = weight if layout.transposed else weight.reshape(out, -1).t()
        else:  # packed codes used as they are: small integers (offset removed) or float values that fit fp8
            values = codec.decode_codes(weight, dt, layout.quantized_shape, out_dtype=torch.float32,
                                        legacy_subnormals=layout.legacy_float_subnormals)
            values = values.reshape(out, -1) if not layout.transposed else values.reshape(-1, out).t()
            codes = (values.to(torch.int8) if integer else values.to(mm.torch_dtype)).t()
            owns = True
        if integer and codes.dtype == torch.uint8:
            # 8-bit unsigned codes: shifted by 128 into int8, the zero point takes the shift
            codes = codes.bitwise_xor(128).view(torch.int8)
            owns = True
            if zero_point is not None:
                zero_point = torch.add(zero_point, scale, alpha=128)
    mw = MatmulWeight(integer=integer, asymmetric=integer and mm.unsigned, codes=codes, scale=scale,
                      zero_point=zero_point, owns_memory=owns)
    if mw.asymmetric:
        mw.code_sums = codes.sum(0, keepdim=True, dtype=torch.int32).to(scale.dtype).mul_(scale)
    if not integer:
        mw.activation_dtype = mm.torch_dtype
        mw.product_scale = _float_product_scale(codes.dtype)
    if layout.svd_rank:
        up, down = tensors["svd_up"], tensors["svd_down"]
        if not layout.svd_transposed:
            up, down = up.t(), down.t()
        mw.svd = (down.contiguous(), up.contiguous())
    return mw


# ------------------------------------------------------------------------------------------------- products
@functools.cache
def _onednn_available() -> bool:
    ops = getattr(torch.ops, "onednn", None)
    try:
        return bool(ops is not None and torch.backends.mkldnn.is_available()
                    and hasattr(ops, "qlinear_prepack") and hasattr(ops, "qlinear_pointwise"))
    except (AttributeError, RuntimeError):
        return False


def onednn_packable(mw: MatmulWeight) -> bool:
    return mw.integer and mw.codes.device.type == "cpu" and _onednn_available()


_PACK_SECONDS_PER_WEIGHT = [5e-9]
"""oneDNN's packing time per weight, updated from every packing done (4-5 ns on the development CPU: 0.12 s for a
3072 x 9216 weight, about what 4 unpacked products of it take at 192 tokens)."""


def pack(mw: MatmulWeight) -> None:
    """Pack the int8 codes for oneDNN's matmul; the decoded codes (not the stored ones) are then dropped."""
    start = time.perf_counter()
    with torch.inference_mode(False):
        mw.packed = torch.ops.onednn.qlinear_prepack(mw.codes.t().contiguous(), None)
        mw.__dict__["_ones"] = torch.ones(mw.codes.shape[1])
        mw.__dict__["_zeros"] = torch.zeros(mw.codes.shape[1], dtype=torch.int64)
    _PACK_SECONDS_PER_WEIGHT[0] = (time.perf_counter() - start) / max(mw.codes.numel(), 1)
    mw.pack_later = False
    if mw.source is not None:
        _release_pages(mw.source)
    if mw.owns_memory:
        mw.codes = mw.codes[:0]


def int8_product(xq: torch.Tensor, mw: MatmulWeight) -> torch.Tensor:
    """``xq @ codes`` accumulated exactly in int32 and converted to float32 (as the reference converts it)."""
    if mw.packed is not None:
        # unit scales and no zero point: oneDNN returns the int32 accumulator converted to float32
        return torch.ops.onednn.qlinear_pointwise(xq, 1.0, 0, mw.packed, mw.__dict__["_ones"],
                                                  mw.__dict__["_zeros"], None, 1.0, 0, torch.float32, "none", [],
                                                  "")
    rows = xq.shape[0]
    if xq.device.type == "cuda" and rows <= 16:  # cuBLAS int8 needs more than 16 rows
        xq = F.pad(xq, (0, 0, 0, 17 - rows))
    start = time.perf_counter()
    try:
        acc = torch._int_mm(xq, mw.codes)
    except (RuntimeError, AttributeError, NotImplementedError):
        acc = torch.mm(xq.to(torch.float64), mw.codes.to(torch.float64))  # exact for any realistic sum
    acc = acc[:rows].to(torch.float32)
    if mw.pack_later:  # ski rental: pack once the unpacked products have cost what packing costs
        mw.unpacked_seconds += time.perf_counter() - start
        if mw.unpacked_seconds >= _PACK_SECONDS_PER_WEIGHT[0] * mw.codes.numel():
            pack(mw)
    return acc


def float_product(xq: torch.Tensor, mw: MatmulWeight) -> torch.Tensor:
    """``xq @ codes`` for fp8 / float16 codes, as the reference computes it: on CPU a float16 product of both
    operands scaled by ``1/sqrt(P*K)`` (so no sum overflows float16), scaled back in float32; on CUDA
    ``torch._scaled_mm`` with unit scales (float32 accumulation)."""
    k = xq.shape[-1]
    if xq.device.type == "cuda" and mw.codes.dtype == xq.dtype and xq.dtype in _FP8:
        one = torch.ones((), device=xq.device)
        try:
            return torch._scaled_mm(xq, mw.codes.t().contiguous().t(), scale_a=one, scale_b=one,
                                    out_dtype=torch.float32)
        except (RuntimeError, NotImplementedError):
            pass
    factor = 1 / math.sqrt(mw.product_scale * k)
    a = xq.to(torch.float32).mul_(factor).to(torch.float16)
    b = mw.__dict__.get("_codes16")
    if b is None:
        b = _codes16(mw, factor)
    return torch.mm(a, b).to(torch.float32).mul_(float(mw.product_scale * k))


def _codes16(mw: MatmulWeight, factor: float) -> torch.Tensor:
    return mw.codes.contiguous().to(torch.float32).mul_(factor).to(torch.float16)


_HELPER_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_FP8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))


# ------------------------------------------------------------------------------------------------- activations
def quantize_symmetric(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row int8 codes and scales: ``round(x / (amax/127))``."""
    scale = x.abs().amax(-1, keepdim=True).div_(127)
    return x.div(scale).round_().clamp_(-128, 127).to(torch.int8), scale


def quantize_asymmetric(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row asymmetric 8-bit codes, stored as int8: scale ``(max-min)/255``, offset ``min + 128*scale``."""
    low, high = torch.aminmax(x, dim=-1, keepdim=True)
    scale = high.sub_(low).div_(255)
    offset = low.sub_(scale, alpha=-128)
    return x.sub(offset).div_(scale).round_().clamp_(-128, 127).to(torch.int8), scale, offset


def quantize_float(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row float codes (fp8 e4m3 or float16): ``x / (amax/max)``, NaN-free, clamped to the type's range."""
    top = torch.finfo(dtype).max
    scale = x.abs().amax(-1, keepdim=True).div_(top)
    return x.div(scale).nan_to_num_().clamp_(-top, top).to(dtype), scale


# ------------------------------------------------------------------------------------------------- forward
def matmul_2d(x: torch.Tensor, mw: MatmulWeight, bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """``x`` (tokens, in) times the quantized weight, plus ``bias``, in the reference's order of operations."""
    base = bias
    if mw.svd is not None:
        down, up = (t if t.dtype == x.dtype else t.to(x.dtype) for t in mw.svd)
        low = torch.mm(x, down)
        base = torch.addmm(bias, low, up) if bias is not None else torch.mm(low, up)
    compute = mw.scale.dtype
    helpers = native.qmm_helpers() if x.device.type == "cpu" and compute == torch.float32 else None
    quantized = None
    if helpers is not None and mw.integer and not mw.asymmetric and x.is_contiguous() and x.dtype in _HELPER_DTYPES:
        quantized = helpers.quantize_rows(x)  # x converted to float32 inside: the same values as below
    xc = x if x.dtype == compute or quantized is not None else x.to(compute)
    if mw.integer:
        if quantized is not None:
            xq, sx = quantized
            if mw.zero_point is not None:
                row_sums = xq.sum(-1, keepdim=True, dtype=torch.int32).to(compute).mul_(sx)
                extra = row_sums * mw.zero_point
                base = extra.add_(base) if base is not None else extra
        elif mw.asymmetric:
            xq, sx, offset = quantize_asymmetric(xc)
            extra = mw.code_sums * offset
            if mw.zero_point is not None:
                row_sums = xq.sum(-1, keepdim=True, dtype=torch.int32).to(compute).mul_(sx)
                extra.addcmul_(row_sums, mw.zero_point)
                extra.addcmul_(offset, mw.zero_point, value=xq.shape[-1])
            base = extra.add_(base) if base is not None else extra
        else:
            xq, sx = quantize_symmetric(xc)
            if mw.zero_point is not None:
                row_sums = xq.sum(-1, keepdim=True, dtype=torch.int32).to(compute).mul_(sx)
                extra = row_sums * mw.zero_point
                base = extra.add_(base) if base is not None else extra
        acc = int8_product(xq, mw)
        acc = acc if acc.dtype == compute else acc.to(compute)
    else:
        xq, sx = quantize_float(xc, mw.activation_dtype)
        acc = float_product(xq, mw)
    if (helpers is not None and out_dtype in _HELPER_DTYPES and acc.is_contiguous() and mw.scale.is_contiguous()
            and (base is None or (base.is_contiguous() and base.dtype in _HELPER_DTYPES
                                  and base.shape in ((acc.shape[1],), acc.shape)))):
        y = helpers.scale_rows(acc, sx, mw.scale, base, out_dtype)  # one pass: the same operations per element
        if y is not None:
            return y
    acc.mul_(sx)
    y = torch.addcmul(base, acc, mw.scale) if base is not None else acc.mul_(mw.scale)
    return y if y.dtype == out_dtype else y.to(out_dtype)


def weight_for(layer: nn.Module, cache: bool | None) -> MatmulWeight:
    """The layer's :class:`MatmulWeight`, from its cache when still valid.

    ``cache``: None (default) keeps what costs no memory (views of the stored codes, scales), and packs stored
    8-bit integer codes for oneDNN once the layer has spent as long in unpacked ``torch._int_mm`` products as
    packing takes (packing costs ~4 unpacked products at 192 tokens: a short run never pays it, a long one gets
    the packed speed after a few calls; at most twice the better choice's time, the ski-rental bound); True packs
    at once and keeps re-quantized / decoded codes (one byte per weight, two for a float16 operand); False keeps
    nothing and multiplies with ``torch._int_mm``."""
    weight = layer.weight
    # inference tensors (made under torch.inference_mode) cannot change in place: they have no version counter
    key = (cache, weight.device, *((t.data_ptr(), -1 if t.is_inference() else t._version)
                                   for t in layer.sdnq_tensors().values()))
    entry = layer.__dict__.get("_sdnq_qmm_cache")
    if entry is not None and entry[0] == key:
        return entry[1]
    with torch.no_grad(), torch.inference_mode(False):
        mw = prepare(layer)
        mw.source = None if mw.owns_memory else weight
        keep = cache is True or (cache is None and not mw.owns_memory)
        if cache is True and onednn_packable(mw):
            pack(mw)
        elif cache is None and onednn_packable(mw) and _direct_8bit(layer):
            mw.pack_later = keep = True  # uint8's shifted codes are kept until then (one byte per weight)
        elif cache is True and not mw.integer:
            mw.__dict__["_codes16"] = _codes16(mw, 1 / math.sqrt(mw.product_scale * mw.codes.shape[0]))
    if keep:
        layer.__dict__["_sdnq_qmm_cache"] = (key, mw)
    else:
        layer.__dict__.pop("_sdnq_qmm_cache", None)
    return mw


def _direct_8bit(layer: nn.Module) -> bool:
    """Stored 8-bit integer codes used without re-quantization (int8, uint8 shifted by 128)."""
    layout = layer.sdnq_layout
    return layout.dtype.kind == "native" and layout.dtype.bits == 8 and not requantizes(layout)


def _release_pages(weight: torch.Tensor) -> None:
    """Hand the pages of stored codes that lie in a clean checkpoint mapping back to the kernel (the packed copy
    is used instead; anything reading the codes later gets them back from the file)."""
    from .replace import _drop_pages, _file_mappings

    if weight.device.type != "cpu" or not weight.is_contiguous():
        return
    start = weight.data_ptr()
    end = start + weight.numel() * weight.element_size()
    for lo, hi, clean in _file_mappings():
        if lo <= start and end <= hi:
            if clean:
                _drop_pages(start, end)
            return


def tokens_of(x: torch.Tensor) -> int:
    return x.numel() // max(x.shape[-1], 1) if x.dim() else 0


def linear(layer: nn.Module, x: torch.Tensor, cache: bool | None = None) -> torch.Tensor:
    """Forward of a quantized linear through the quantized matmul (the caller checked that it applies)."""
    layout: LayerLayout = layer.sdnq_layout
    dtype = x.dtype if x.is_floating_point() else layer.compute_dtype
    x = x.to(dtype)
    mw = weight_for(layer, cache)
    x2 = x.reshape(-1, x.shape[-1])
    if layout.hadamard_size:
        x2 = hadamard.rotate(x2, layout.hadamard_size, legacy=layout.hadamard_legacy)
    bias = layer.bias
    with torch.no_grad():
        y = matmul_2d(x2, mw, bias, dtype)
    return y.view(*x.shape[:-1], y.shape[-1])


def conv(layer: nn.Module, x: torch.Tensor, cache: bool | None = None) -> torch.Tensor:
    """Forward of a quantized convolution through the quantized matmul: patches as rows (im2col), one quantized
    product, the output laid back out as channels-first."""
    dtype = x.dtype if x.is_floating_point() else layer.compute_dtype
    x = x.to(dtype)
    mw = weight_for(layer, cache)
    dims = len(layer.kernel_size)
    if layer.padding_mode != "zeros":
        x = F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
        padding = (0,) * dims
    else:
        padding = tuple(layer.padding)
    x = F.pad(x, [p for p in reversed(padding) for _ in range(2)]) if any(padding) else x
    patches = x
    for d in range(dims):  # (B, C, *spatial) -> (B, C, *out_spatial, *kernel)
        patches = patches.unfold(2 + d, layer.dilation[d] * (layer.kernel_size[d] - 1) + 1, layer.stride[d])
        if layer.dilation[d] > 1:
            patches = patches[..., :: layer.dilation[d]]
    batch, channels = x.shape[:2]
    out_spatial = patches.shape[2:2 + dims]
    order = (0, *range(2, 2 + dims), 1, *range(2 + dims, 2 + 2 * dims))
    rows = patches.permute(order).reshape(-1, channels * math.prod(layer.kernel_size))
    with torch.no_grad():
        y = matmul_2d(rows, mw, layer.bias, dtype)
    y = y.view(batch, *out_spatial, y.shape[-1])
    return y.permute(0, dims + 1, *range(1, dims + 1)).contiguous()
