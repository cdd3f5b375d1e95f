"""Layout planning: which tensors a quantized layer stores, with which shapes and dtypes.

SDNQ files carry no per-layer metadata. The layout of a layer follows from the quantization options that
apply to it (:class:`LayerOptions`) and the dense weight's shape, by the rules of ``docs/format-spec.md`` §3-§4.
:func:`plan_layer` applies those rules; :func:`check_stored` compares a plan with the tensors actually found
in a file and says precisely what does not fit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import torch

from . import packing
from .dtypes import QDType, get_dtype
from .errors import SDNQConfigError, SDNQFormatError, SDNQShapeError

LayerKind = Literal["linear", "conv", "conv_transpose", "embedding"]

_KIND_BY_CLASS: dict[str, LayerKind] = {
    "Linear": "linear",
    "Embedding": "embedding",
    "Conv1d": "conv",
    "Conv2d": "conv",
    "Conv3d": "conv",
    "ConvTranspose1d": "conv_transpose",
    "ConvTranspose2d": "conv_transpose",
    "ConvTranspose3d": "conv_transpose",
}


def layer_kind_of(class_name: str) -> LayerKind | None:
    """Map a torch layer class name to the layout family the format uses for it (None: not quantizable)."""
    if class_name.startswith("SDNQ"):
        class_name = class_name[4:]
    if class_name.endswith("ScaledWordEmbedding"):
        return "embedding"
    return _KIND_BY_CLASS.get(class_name)


@dataclass(frozen=True)
class LayerOptions:
    """The quantization options that decide one layer's layout (after per-layer overrides were applied)."""

    weights_dtype: str = "int8"
    group_size: int = 0
    use_svd: bool = False
    svd_rank: int = 32
    use_hadamard: bool = False
    hadamard_group_size: int = 256
    use_codebook: bool = False
    use_quantized_matmul: bool = False
    quantized_matmul_dtype: str | None = None
    scale_dtype: str | None = None
    zero_point_dtype: str | None = None
    use_codebook_scale: bool = False
    dequantize_fp32: bool = True
    hadamard_legacy: bool | str = False
    """True for files written before sdnq 0.2.0 (always Sylvester Hadamard matrices); ``"0.2.1"`` for that release,
    which applied the rotation as a linear layer (see :func:`hadamard.rotate`)."""
    legacy_float_subnormals: bool | str = False
    """Custom-float reading of sdnq 0.1.3-0.2.1 (exponent 0 read as a normal number): ``"0.1.3"`` (0.1.3-0.1.5) or
    ``"0.1.6"`` / True (0.1.6-0.2.1), which differ in their zero codes (see :func:`floats.decode`)."""
    matmul_excluded_by: str | None = None
    """Why the config turns the quantized matmul off for this layer (a ``modules_to_not_use_matmul`` or
    ``modules_quant_config`` pattern), so switching it on for a loaded model can skip the layer and say why."""
    uint_matmul: bool = True
    """uint8 weights may use a uint8 matmul (sdnq ≥ 0.2.2); before that every unsigned type re-quantized."""
    legacy_packed_matmul: bool = False
    """sdnq ≤ 0.1.3 also stored *packed* Linear weights transposed (in, out) for a quantized matmul."""
    legacy_conv_transpose_groups: bool = False
    """sdnq < 0.1.9 grouped a ConvTranspose by splitting its input channels (dim 0) into (groups, group_size)."""


@dataclass(frozen=True)
class TensorSpec:
    """What one stored tensor must look like. ``dtypes`` lists the accepted dtypes (first = what we write)."""

    shape: tuple[int, ...]
    dtypes: tuple[torch.dtype, ...]

    def describe(self) -> str:
        names = " or ".join(str(d).replace("torch.", "") for d in self.dtypes)
        return f"{names} {list(self.shape)}"


@dataclass(frozen=True)
class LayerLayout:
    """The full layout of one quantized layer: everything needed to decode it, nothing model-specific."""

    kind: LayerKind
    weight_shape: tuple[int, ...]
    dtype: QDType
    group_size: int
    """Elements per group; -1 row-wise, -2 tensor-wise."""
    num_groups: int
    quantized_shape: tuple[int, ...]
    """Shape of the code tensor before packing (grouped / flattened / transposed)."""
    scale_shape: tuple[int, ...]
    transposed: bool = False
    svd_transposed: bool = False
    """SVD factors are stored transposed whenever the layer uses a quantized matmul, even if the weight is not."""
    svd_rank: int = 0
    codebook: bool = False
    hadamard_size: int = 0
    hadamard_legacy: bool | str = False
    scale_qdtype: QDType | None = None
    zero_point_qdtype: QDType | None = None
    codebook_scale: bool = False
    legacy_float_subnormals: bool | str = False
    options: LayerOptions = field(default_factory=LayerOptions, compare=False, repr=False)

    @property
    def has_zero_point(self) -> bool:
        return self.dtype.needs_zero_point and not self.codebook

    @property
    def out_channels(self) -> int:
        return self.weight_shape[1] if self.kind == "conv_transpose" else self.weight_shape[0]

    @property
    def reduction_size(self) -> int:
        return _reduction_size(self.kind, self.weight_shape)

    @property
    def svd_shapes(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """(svd_up, svd_down) shapes as stored."""
        out = self.weight_shape[0]
        rest = math.prod(self.weight_shape[1:])
        if self.svd_transposed:
            return (self.svd_rank, out), (rest, self.svd_rank)
        return (out, self.svd_rank), (self.svd_rank, rest)

    def weight_spec(self) -> TensorSpec:
        numel = math.prod(self.quantized_shape)
        if self.dtype.kind == "native":
            return TensorSpec(self.quantized_shape, (self.dtype.torch_dtype,))
        if self.dtype.bits in (8, 16):  # custom 8/16-bit floats: one code word per value, unpacked
            return TensorSpec(self.quantized_shape, (self.dtype.storage_dtype,))
        shape = packing.packed_shape(numel, self.dtype.bits)
        if self.dtype.bits == 1:
            return TensorSpec(shape, (torch.uint8, torch.int64))
        return TensorSpec(shape, (torch.uint8,) if self.dtype.bits < 8 else (torch.int16, torch.uint16))

    def expected_tensors(self, float_dtypes: Sequence[torch.dtype] = (torch.float32, torch.bfloat16, torch.float16)
                         ) -> dict[str, TensorSpec]:
        """Every tensor the layer stores (besides ``bias``), keyed by its name under the layer."""
        floats = tuple(float_dtypes)
        specs = {"weight": self.weight_spec()}
        specs.update(_companion_specs("scale", self.scale_shape, self.scale_qdtype, self.codebook_scale,
                                      floats, "scale_2", "scale_zero_point"))
        if self.has_zero_point:
            specs.update(_companion_specs("zero_point", self.scale_shape, self.zero_point_qdtype, self.codebook_scale,
                                          floats, "zero_point_scale", "zero_point_2"))
        if self.svd_rank:
            up, down = self.svd_shapes
            specs["svd_up"] = TensorSpec(up, floats)
            specs["svd_down"] = TensorSpec(down, floats)
        return specs


def _companion_specs(name: str, shape: tuple[int, ...], qdtype: QDType | None, codebook: bool,
                     floats: tuple[torch.dtype, ...], scale_key: str, zero_key: str) -> dict[str, TensorSpec]:
    if qdtype is None:
        return {name: TensorSpec(shape, floats)}
    numel = math.prod(shape)
    specs: dict[str, TensorSpec] = {}
    if qdtype.kind == "native" or qdtype.bits in (8, 16):
        specs[name] = TensorSpec(shape, (qdtype.torch_dtype or qdtype.storage_dtype,))
    else:
        dts = (torch.uint8, torch.int64) if qdtype.bits == 1 else (
            (torch.uint8,) if qdtype.bits < 8 else (torch.int16, torch.uint16))
        specs[name] = TensorSpec(packing.packed_shape(numel, qdtype.bits), dts)
    specs[scale_key] = TensorSpec((2**qdtype.bits,) if codebook else (1,), floats)
    if qdtype.needs_zero_point and not codebook:
        specs[zero_key] = TensorSpec((1,), floats)
    return specs


def _reduction_size(kind: LayerKind, shape: Sequence[int]) -> int:
    if kind in ("linear", "conv"):
        return shape[1]
    if kind == "conv_transpose":
        return shape[0]
    return shape[-1]


def _default_matmul_dtype(dt: QDType, opts: LayerOptions) -> QDType:
    if opts.quantized_matmul_dtype is not None:
        return get_dtype(opts.quantized_matmul_dtype, what="quantized_matmul_dtype")
    if dt.is_integer:
        return get_dtype("uint8" if dt.name == "uint8" and opts.uint_matmul else "int8")
    if dt.bits < 16:
        return get_dtype("float8_e4m3fn")
    return get_dtype("float16")


def _needs_requantize(dt: QDType, mm: QDType, opts: LayerOptions) -> bool:
    """True when a quantized matmul could not use the stored codes directly (so storage stays normal)."""
    if opts.use_codebook or opts.scale_dtype is not None or opts.zero_point_dtype is not None:
        return True
    if dt.bits > mm.bits or dt.is_integer != mm.is_integer:
        return True
    if dt.unsigned and (not mm.is_integer or not opts.uint_matmul):
        return True
    return dt.kind == "float" and (dt.bits >= mm.bits or dt.qmax > mm.qmax)


MAX_MODEL_DTYPE_RANGE = 16384.0
"""Above this range a scale in bf16/fp16 would lose too much; the format then keeps float32 scales."""


def companion_dtype(qdtype: QDType, dequantize_fp32: bool, compute_dtype: torch.dtype) -> torch.dtype:
    """dtype of ``scale`` / ``zero_point`` (or codebook levels) as the format stores and loads them.

    float32 when ``dequantize_fp32`` (the default), when the model is float32/float64, or when the weight type's
    range exceeds 16384 (int16, float16, ...); otherwise the model dtype. Measured on sdnq 0.2.8 files.
    """
    if dequantize_fp32 or qdtype.qmax > MAX_MODEL_DTYPE_RANGE or compute_dtype not in (torch.bfloat16, torch.float16):
        return torch.float32
    return compute_dtype


def fit_group_size(group_size: int, channels: int) -> tuple[int, int]:
    """Fit a requested group size to ``channels``: returns (group_size, num_groups); -1 means row-wise."""
    if group_size < 0:
        return group_size, 1
    if group_size >= channels:
        return -1, 1
    groups = channels // group_size
    while groups * group_size != channels:
        groups -= 1
        if groups <= 1:
            return -1, 1
        group_size = channels // groups
    return group_size, groups


def hadamard_size(channels: int, requested: int) -> int:
    """Effective Hadamard block size for ``channels`` (0 = no rotation)."""
    g = 1 << max(0, math.ceil(math.log2(max(1, min(channels, requested)))))
    while g > 1 and channels % g:
        g //= 2
    return g if g >= 4 else 0


def plan_layer(kind: LayerKind, weight_shape: Sequence[int], opts: LayerOptions) -> LayerLayout:
    """Apply the format's rules to get a layer's layout from its options and dense weight shape."""
    shape = tuple(int(s) for s in weight_shape)
    dt = get_dtype(opts.weights_dtype)
    if opts.use_codebook and not (dt.kind == "int" or dt.name == "uint8") or opts.use_codebook and dt.signed:
        raise SDNQConfigError(f"use_codebook needs an unsigned integer weights_dtype, got {dt.name!r}")
    out = shape[1] if kind == "conv_transpose" else shape[0]
    channels = _reduction_size(kind, shape)
    flat_in = math.prod(shape[1:])

    matmul = False
    requant = True
    if opts.use_quantized_matmul and kind in ("linear", "conv"):
        mm = _default_matmul_dtype(dt, opts)
        requant = _needs_requantize(dt, mm, opts)
        matmul = out >= 32 and flat_in >= 32 and out % 16 == 0 and flat_in % 16 == 0

    group_size = opts.group_size
    if group_size == 0:
        if matmul and not requant and dt.bits >= 6:
            group_size = -1
        else:
            exponent = dt.bits + 1 + (kind == "linear") + bool(opts.use_svd) + 3 * bool(opts.use_codebook)
            group_size = 2**exponent
    group_size, groups = fit_group_size(group_size, channels)
    if groups > 1:
        requant = True
    transposed = matmul and not requant and (not dt.packed or opts.legacy_packed_matmul and kind == "linear")

    hsize = hadamard_size(shape[1], opts.hadamard_group_size) if opts.use_hadamard else 0

    cb = 2**dt.bits if opts.use_codebook else 1
    if group_size == -2:  # one scale for the whole tensor
        if opts.use_codebook:
            qshape, scale_shape = shape, (cb,)
        elif transposed:
            qshape, scale_shape = (flat_in, out), (1, 1)
        else:
            qshape, scale_shape = shape, tuple(1 for _ in shape)
    elif kind in ("linear", "embedding"):
        if transposed:
            qshape, scale_shape = (shape[1], shape[0]), (1, shape[0])
        elif group_size > 0:
            qshape, scale_shape = (shape[0], groups, group_size), (shape[0], groups, cb)
        else:
            qshape, scale_shape = shape, (shape[0], cb)
    elif kind == "conv":
        k = shape[2:]
        if transposed:
            qshape, scale_shape = (flat_in, out), (1, out)
        elif matmul and not requant and group_size < 0 and not dt.packed:
            qshape, scale_shape = (out, flat_in), (out, cb)
        elif group_size > 0:
            qshape, scale_shape = (out, groups, group_size, *k), (out, groups, cb, *k)
        else:
            qshape, scale_shape = shape, (out, cb, *k)
    else:  # conv_transpose: reduction over dim 0 when row-wise
        k = shape[2:]
        if group_size > 0 and opts.legacy_conv_transpose_groups:  # sdnq < 0.1.9: dim 0 split as (groups, size)
            qshape, scale_shape = (groups, group_size, *shape[1:]), (groups, cb, *shape[1:])
        elif group_size > 0:
            # Measured on the reference: the group count is fitted to the input channels (dim 0), but the split
            # is applied to the output channels (dim 1) as (group_size, groups), so group j holds the output
            # channels j, j + groups, ... It can only be written when that split fits dim 1.
            if group_size * groups != shape[1]:
                raise SDNQConfigError(
                    f"grouped quantization of a ConvTranspose layer with weight {list(shape)}: {groups} groups of "
                    f"{group_size} (fitted to the {shape[0]} input channels) do not split its {shape[1]} output "
                    "channels; no SDNQ writer can produce this layout, the file or its config is inconsistent"
                )
            qshape, scale_shape = (shape[0], group_size, groups, *k), (shape[0], cb, groups, *k)
        else:
            qshape, scale_shape = shape, (cb, *shape[1:])

    scale_qdtype = get_dtype(opts.scale_dtype, what="scale_dtype") if opts.scale_dtype else None
    zp_name = opts.zero_point_dtype or opts.scale_dtype
    zp_qdtype = get_dtype(zp_name, what="zero_point_dtype") if zp_name else None
    # Keep the release-specific readings only where they change the numbers, so equal layouts compare equal.
    floats_used = any(q is not None and q.kind == "float" for q in (dt, scale_qdtype, zp_qdtype))
    legacy_floats = opts.legacy_float_subnormals if floats_used else False
    legacy_hadamard = opts.hadamard_legacy if hsize else False
    if legacy_hadamard is True and math.log2(hsize) % 2:  # not a power of 4: the matrices agree
        legacy_hadamard = False
    return LayerLayout(
        kind=kind,
        weight_shape=shape,
        dtype=dt,
        group_size=group_size,
        num_groups=groups,
        quantized_shape=tuple(qshape),
        scale_shape=tuple(scale_shape),
        transposed=transposed,
        svd_transposed=matmul,
        svd_rank=opts.svd_rank if opts.use_svd else 0,
        codebook=opts.use_codebook,
        hadamard_size=hsize,
        hadamard_legacy=legacy_hadamard,
        scale_qdtype=scale_qdtype,
        zero_point_qdtype=zp_qdtype if dt.needs_zero_point and not opts.use_codebook else None,
        codebook_scale=opts.use_codebook_scale,
        legacy_float_subnormals=legacy_floats,
        options=opts,
    )


def check_stored(layout: LayerLayout, tensors: Mapping[str, torch.Tensor | tuple[tuple[int, ...], torch.dtype]],
                 prefix: str = "", source: str | None = None) -> LayerLayout:
    """Compare stored tensors (or (shape, dtype) pairs) with a plan; raise naming every mismatch.

    Returns the layout, adjusted where the files show a legal variant the plan could not know: an SVD rank
    other than the configured one (taken from the factors) and dtype of the float companions.
    """
    where = f" in {source}" if source else ""

    def meta(value: torch.Tensor | tuple[tuple[int, ...], torch.dtype]) -> tuple[tuple[int, ...], torch.dtype]:
        if isinstance(value, torch.Tensor):
            return tuple(value.shape), value.dtype
        return tuple(value[0]), value[1]

    if layout.svd_rank and "svd_up" in tensors:
        up_shape, _ = meta(tensors["svd_up"])
        if len(up_shape) == 2:
            rank = up_shape[0] if layout.svd_transposed else up_shape[1]
            if rank != layout.svd_rank and rank > 0:
                layout = replace(layout, svd_rank=rank)
    expected = layout.expected_tensors()
    problems: list[str] = []
    for key, spec in expected.items():
        if key not in tensors:
            problems.append(f"missing tensor '{prefix}{key}' (expected {spec.describe()})")
            continue
        shape, dtype = meta(tensors[key])
        if shape != spec.shape or dtype not in spec.dtypes:
            problems.append(
                f"'{prefix}{key}' is {str(dtype).replace('torch.', '')} {list(shape)}, expected {spec.describe()}"
            )
    extra = sorted(set(tensors) - set(expected) - {"bias"})
    for key in extra:
        problems.append(f"unexpected tensor '{prefix}{key}' for this layer's layout")
    if problems:
        if "weight" in tensors and "scale" in tensors:
            facts = infer_stored(layout.kind, layout.weight_shape, tensors)
            problems.append(f"the stored tensors look like: {facts.describe()}")
        raise SDNQShapeError(
            f"Stored tensors of layer '{prefix.rstrip('.')}'{where} do not fit its SDNQ layout "
            f"({layout.dtype.name}, weight {list(layout.weight_shape)}, group_size {layout.group_size}"
            f"{f', svd rank {layout.svd_rank}' if layout.svd_rank else ''}"
            f"{', transposed' if layout.transposed else ''}): " + "; ".join(problems)
        )
    return layout


@dataclass(frozen=True)
class StoredFacts:
    """What a layer's stored tensors alone say about its layout (no config needed).

    The code width comes from the byte count, the grouping from the scale's size, the transposition from the
    code tensor's shape. The type family (int, uint, float) cannot be seen in the bytes; a zero point implies an
    asymmetric (unsigned) type.
    """

    bits: int | None
    """Code width in bits; None when the byte count fits no width."""
    storage: str
    """``packed``, ``native`` (one stored element per weight element) or ``unknown``."""
    group_size: int | None
    """Elements per group, -1 row-wise, -2 tensor-wise; None when the scale's size fits no grouping."""
    num_groups: int | None
    transposed: bool
    has_zero_point: bool
    svd_rank: int

    def describe(self) -> str:
        parts = [f"{self.bits}-bit codes" if self.bits else "codes of no known width"]
        if self.group_size == -2:
            parts.append("one scale for the whole tensor")
        elif self.group_size == -1:
            parts.append("one scale per output channel")
        elif self.group_size:
            parts.append(f"{self.num_groups} groups of {self.group_size}")
        else:
            parts.append("a scale that fits no grouping")
        if self.transposed:
            parts.append("transposed")
        parts.append("a zero point" if self.has_zero_point else "no zero point")
        if self.svd_rank:
            parts.append(f"SVD rank {self.svd_rank}")
        return ", ".join(parts)


def infer_stored(kind: LayerKind, weight_shape: Sequence[int],
                 tensors: Mapping[str, torch.Tensor | tuple[tuple[int, ...], torch.dtype]]) -> StoredFacts:
    """Recover code width, grouping and transposition of a layer from its stored tensors and dense shape.

    Used to explain a mismatch between a config and the files, and by tools that inspect unknown files.
    """
    shape = tuple(int(s) for s in weight_shape)
    numel = math.prod(shape)

    def meta(value: torch.Tensor | tuple[tuple[int, ...], torch.dtype]) -> tuple[tuple[int, ...], torch.dtype]:
        if isinstance(value, torch.Tensor):
            return tuple(value.shape), value.dtype
        return tuple(value[0]), value[1]

    w_shape, w_dtype = meta(tensors["weight"]) if "weight" in tensors else ((), torch.uint8)
    w_numel = math.prod(w_shape) if w_shape else 0
    bits: int | None = None
    storage = "unknown"
    if w_numel == numel:
        storage = "native"
        bits = torch.finfo(w_dtype).bits if w_dtype.is_floating_point else torch.iinfo(w_dtype).bits
    else:
        word_bytes = torch.empty((), dtype=w_dtype).element_size()
        for b in sorted(packing.LAYOUTS):
            if (b > 8) != (word_bytes == 2) and not (b == 1 and word_bytes == 8):
                continue  # widths below 8 pack into bytes, 9-15 into 16-bit words
            try:
                if packing.packed_shape(numel, b) == w_shape:
                    bits, storage = b, "packed"
                    break
            except SDNQFormatError:
                continue
    out = shape[1] if kind == "conv_transpose" else shape[0]
    flat_in = numel // out
    transposed = storage == "native" and len(shape) >= 2 and w_shape == (flat_in, out) and w_shape != shape
    group_size: int | None = None
    groups: int | None = None
    if "scale" in tensors:
        s_numel = math.prod(meta(tensors["scale"])[0])
        reduction = _reduction_size(kind, shape)
        if kind == "conv" and storage == "native" and len(w_shape) == 2:  # matmul-ready conv: kernel in the rows
            reduction = flat_in
        if s_numel == 1:
            group_size, groups = -2, 1
        elif s_numel > 0 and s_numel * reduction % numel == 0:
            groups = s_numel * reduction // numel
            if groups == 1:
                group_size = -1
            elif reduction % groups == 0:
                group_size = reduction // groups
            else:
                groups = None
    rank = 0
    if "svd_up" in tensors:
        up = meta(tensors["svd_up"])[0]
        if len(up) == 2:
            rank = up[0] if up[1] == shape[0] and up[0] != shape[0] else up[1]
    return StoredFacts(bits=bits, storage=storage, group_size=group_size, num_groups=groups, transposed=transposed,
                       has_zero_point="zero_point" in tensors, svd_rank=rank)
