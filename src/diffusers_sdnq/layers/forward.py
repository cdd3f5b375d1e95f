"""Forward of quantized linears that never holds the whole dense weight.

The weight is decoded in blocks of output rows, each multiplied while it is still in cache: the forward then
needs block-sized temporaries instead of several dense-size ones (int codes, float codes, the weight, its SVD
product) and reads the packed bytes instead of writing and re-reading a dense weight. Each block is decoded with
exactly the operations of :func:`~diffusers_sdnq.format.codec.dequantize` (integer codes by the compiled decoder
of :mod:`.native` when it is available, which is checked to round the same), so it is bit-identical to the
matching rows of ``dequantize_weight()``; BLAS computes each output element from its own weight row and the same
``x``, so the product equals ``F.linear(x, weight)`` bit for bit (checked by ``tests/test_forward.py``; blocks
are kept at least :data:`MIN_ROWS` rows tall because MKL uses other kernels, with other sums, for very thin
matrices).

SVD correction. By default (``svd="activations"``) it is applied as a low-rank branch,
``(x @ svd_downᵀ) @ svd_upᵀ``, instead of being added to every weight block: rebuilding ``up @ down`` costs
2·rank flops per weight element, 17-25 % of the matmul itself at 128-192 tokens, the branch ~1 %. The output
then differs from ``F.linear(x, dequantize_weight())`` (and from the reference's forward, which adds the product
to the weight) by float rounding only: ~1e-7 relative in float32, a bf16 ulp here and there in bfloat16, far
below the quantization error both share. ``svd="weight"`` restores the bit-exact forward.

Options (:class:`ForwardOptions`, per model with :func:`set_forward_options` or for the process with
``DIFFUSERS_SDNQ_FORWARD="svd=weight,cache=1,chunk_mb=8"``): ``svd`` as above; ``cache=True`` keeps the
dequantized weight after the first forward (dense-size memory, dense speed); ``chunk_mb`` sets the block size.
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
from collections.abc import Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..format import codec, hadamard
from ..format.dtypes import QDType
from ..format.layout import LayerLayout
from ..format.packing import LAYOUTS
from . import native, ops, qmatmul, triton_decode

MIN_ROWS = 64
"""Smallest block height. MKL switches to other kernels (other summation orders) below ~12 output columns."""


@dataclasses.dataclass(frozen=True)
class ForwardOptions:
    """How quantized linears run their forward. With ``svd="weight"`` the forward is bit-exact with
    ``F.linear(x, dequantize_weight())``; the default differs from it by float rounding in SVD layers only."""

    chunk_mb: float = 16.0
    """Dense megabytes (in the compute dtype) decoded per block on CPU; 0 decodes the whole weight at once. Blocks grow up to
    4x this when the input is large (every block's matmul packs the whole input again: see
    :func:`block_megabytes`). 16 was fastest with the compiled decoder on the 2-core development CPU (32 MB L3)
    for the Klein slice's layers; 2-8 MB cost 5-40 % more there."""
    svd: str = "activations"
    """``"activations"`` (low-rank branch on the activations: fast, equal up to float rounding) or ``"weight"``
    (the product added to the weight, as the reference does: bit-exact, slower)."""
    cache: bool = False
    """Keep the dense weight after the first forward: dense speed for dense-size memory."""
    quantized_matmul: bool | None = None
    """Quantized matmul (:mod:`.qmatmul`): None follows the checkpoint (``use_quantized_matmul`` at save time),
    True uses it in every layer that allows it, False never."""
    quantized_matmul_cache: bool | None = None
    """What the quantized matmul keeps between calls: None packs stored 8-bit codes for oneDNN; True also keeps
    re-quantized codes of packed / grouped weights (one byte per weight); False keeps nothing."""

    def __post_init__(self) -> None:
        if self.svd not in ("weight", "activations"):
            raise ValueError(f"ForwardOptions.svd must be 'weight' or 'activations', got {self.svd!r}")
        if self.chunk_mb < 0:
            raise ValueError(f"ForwardOptions.chunk_mb must be >= 0, got {self.chunk_mb}")


def options_from_env(value: str | None = None) -> ForwardOptions:
    """Parse ``DIFFUSERS_SDNQ_FORWARD`` (``key=value`` pairs separated by commas).

    ``value`` given: an item that cannot be read raises ``ValueError``. Read from the environment (``value`` None,
    which happens while diffusers/transformers are imported): each such item is reported once as a warning naming
    the variable and the value, and its default is used; this never raises."""
    strict = value is not None
    text = os.environ.get("DIFFUSERS_SDNQ_FORWARD", "") if value is None else value
    kwargs: dict[str, object] = {}
    bad: list[str] = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            key, parsed = _forward_item(item)
            ForwardOptions(**{key: parsed})  # type: ignore[arg-type]  # the value's own checks
        except ValueError:
            if strict:
                raise
            bad.append(item)
            continue
        kwargs[key] = parsed
    if bad:
        from .._env import report_bad_value

        report_bad_value("DIFFUSERS_SDNQ_FORWARD", text, "comma-separated chunk_mb=N (N >= 0), "
                         "svd=weight|activations, cache=0|1, quantized_matmul=0|1|auto, "
                         "quantized_matmul_cache=0|1|auto", "the defaults for " + ", ".join(map(repr, bad)))
    return ForwardOptions(**kwargs)  # type: ignore[arg-type]


def _forward_item(item: str) -> tuple[str, object]:
    """One ``key=value`` of ``DIFFUSERS_SDNQ_FORWARD``, checked (ValueError naming the item otherwise)."""
    key, sep, raw = item.partition("=")
    key, raw = key.strip(), raw.strip()
    problem = (f"DIFFUSERS_SDNQ_FORWARD: cannot read {item!r}; expected chunk_mb=N, svd=weight|activations, "
               "cache=0|1, quantized_matmul=0|1|auto or quantized_matmul_cache=0|1|auto")
    if not sep or key not in ("chunk_mb", "svd", "cache", "quantized_matmul", "quantized_matmul_cache"):
        raise ValueError(problem)
    if key.startswith("quantized_matmul"):
        if raw.lower() not in ("auto", "1", "true", "yes", "0", "false", "no"):
            raise ValueError(problem)
        return key, None if raw.lower() == "auto" else raw.lower() in ("1", "true", "yes")
    if key == "chunk_mb":
        try:
            number = float(raw)
        except ValueError:
            raise ValueError(problem) from None
        if not math.isfinite(number) or number < 0:
            raise ValueError(problem)
        return key, number
    if key == "cache":
        if raw.lower() not in ("1", "true", "yes", "0", "false", "no"):
            raise ValueError(problem)
        return key, raw.lower() in ("1", "true", "yes")
    return key, raw


DEFAULT_OPTIONS = options_from_env()


def set_forward_options(model: nn.Module, options: ForwardOptions | None = None, *,
                        modules: str | Iterable[str] | None = None, **changes: object) -> int:
    """Set the forward options of every quantized layer under ``model`` (``options`` and/or field changes on top
    of each layer's current ones). ``modules``: only the layers whose qualified name matches one of these
    patterns (SDNQ's name matching, as in ``modules_to_not_convert``: a name component, a ``*`` wildcard, or a
    ``.prefix``). Drops cached dense and quantized-matmul weights. Returns the number of layers changed."""
    from ..format.patterns import PatternSet

    patterns = PatternSet([modules] if isinstance(modules, str) else list(modules)) if modules is not None else None
    count = 0
    for name, module in model.named_modules():
        if hasattr(module, "sdnq_layout") and (patterns is None or patterns.matches(name)):
            base = options or getattr(module, "sdnq_forward_options", None) or DEFAULT_OPTIONS
            module.sdnq_forward_options = dataclasses.replace(base, **changes)
            module.__dict__.pop("_sdnq_dense_cache", None)
            module.__dict__.pop("_sdnq_qmm_cache", None)
            count += 1
    return count


# ---------------------------------------------------------------------------------------------------------- decoding
def row_alignment(layout: LayerLayout) -> int | None:
    """Rows a block must be a multiple of (packed chunks must not straddle blocks); None if rows cannot be
    decoded separately (transposed storage, non-linear layers)."""
    if layout.kind != "linear" or layout.transposed or len(layout.weight_shape) != 2:
        return None
    if layout.quantized_shape[0] != layout.weight_shape[0]:
        return None
    dt = layout.dtype
    if dt.kind == "native" or dt.bits in (8, 16):
        return 1
    per_row = math.prod(layout.quantized_shape[1:])
    group = LAYOUTS[dt.bits].values_per_chunk
    return group // math.gcd(per_row, group)


class RowDecoder:
    """Decodes rows ``[start, stop)`` of one layer's dense weight, bit-identical to the same rows of
    :func:`codec.dequantize`. The (small) scales are rebuilt once, when the decoder is made."""

    def __init__(self, layout: LayerLayout, tensors: Mapping[str, torch.Tensor], *, use_native: bool = True):
        self.layout = layout
        self.weight = tensors["weight"]
        self.scale = codec._dequantize_companion(tensors, "scale", layout.scale_qdtype, layout.scale_shape,
                                                 layout.codebook_scale, "scale_2", "scale_zero_point",
                                                 layout.legacy_float_subnormals)
        self.zero_point = None
        if layout.has_zero_point:
            self.zero_point = codec._dequantize_companion(tensors, "zero_point", layout.zero_point_qdtype,
                                                          layout.scale_shape, layout.codebook_scale,
                                                          "zero_point_scale", "zero_point_2",
                                                          layout.legacy_float_subnormals)
        self.up = self.down = None
        if layout.svd_rank:
            up, down = tensors["svd_up"], tensors["svd_down"]
            # contiguous like the codec's: BLAS may sum differently for transposed operands
            self.up, self.down = (up.t().contiguous(), down.t().contiguous()) if layout.svd_transposed else (up, down)
        self.rows_total = layout.weight_shape[0]
        self.per_row = math.prod(layout.quantized_shape[1:])
        self.units = self.weight
        self.native, self.group = self._native_plan() if use_native else (None, 0)
        self.lut = native.float_table(layout.dtype, layout.legacy_float_subnormals) if self.native else None

    def _native_plan(self) -> tuple[native.NativeDecoder | None, int]:
        """The compiled decoder and the values per scale entry, when this layer's storage is one it decodes
        (integer codes in their units, float32 per-row scales); else (None, 0) and the torch path runs."""
        lay, w = self.layout, self.weight
        if lay.codebook or not native.handles(lay.dtype) or w.device.type != "cpu" or not w.is_contiguous():
            return None, 0
        if lay.dtype.bits == 1 and w.dtype == torch.int64:  # the reference stores uint1 bytes as int64 values
            if w.numel() and not 0 <= int(w.min()) <= int(w.max()) <= 255:
                return None, 0
            w = self.units = w.to(torch.uint8)
        pack = LAYOUTS.get(lay.dtype.bits)
        values = self.rows_total * self.per_row
        units = values if pack is None else values // pack.values_per_chunk * pack.units_per_chunk
        if lay.dtype.kind == "native":  # torch int8 / uint8 / float8 weights: the stored dtype is the code's type
            storage_ok = w.dtype == lay.dtype.torch_dtype
        elif pack is None:  # 8-bit codes: any one-byte words, read as unsigned bytes
            storage_ok = w.element_size() == 1
        else:
            storage_ok = w.dtype in ((torch.uint8, torch.int8) if pack.unit_bits == 8 else (torch.int16, torch.uint16))
        if not storage_ok or (pack and values % pack.values_per_chunk) or w.numel() != units:
            return None, 0
        for t in (self.scale, self.zero_point):
            if t is None:
                continue
            if (t.dtype != torch.float32 or not t.is_contiguous() or t.ndim < 2 or t.shape[0] != self.rows_total
                    or t.shape != self.scale.shape or t.device != w.device):
                return None, 0
        per_row_scales = self.scale.numel() // self.rows_total
        if per_row_scales == 0 or self.per_row % per_row_scales:
            return None, 0
        return native.get(), self.per_row // per_row_scales

    def _rows(self, t: torch.Tensor | None, start: int, stop: int) -> torch.Tensor | None:
        """Rows of a per-row companion; tensor-wise ones (one row) broadcast as they are."""
        if t is None or t.ndim < 2 or t.shape[0] != self.rows_total:
            return t
        return t[start:stop]

    def _stored_rows(self, start: int, stop: int) -> torch.Tensor:
        dt = self.layout.dtype
        if dt.kind == "native" or dt.bits in (8, 16):
            return self.weight[start:stop]
        pack = LAYOUTS[dt.bits]
        first, last = (r * self.per_row // pack.values_per_chunk * pack.units_per_chunk for r in (start, stop))
        return self.weight.reshape(-1)[first:last]

    def rows(self, start: int, stop: int, dtype: torch.dtype, *, svd: bool = True,
             workspace: Workspace | None = None) -> torch.Tensor:
        """Rows ``[start, stop)`` of the dense weight in ``dtype``; ``svd=False`` leaves the SVD product out.

        With a ``workspace`` the result lives in its buffers: valid until the next call with that workspace."""
        lay = self.layout
        shape = (stop - start, *lay.quantized_shape[1:])
        numel = (stop - start) * self.per_row
        scale = self._rows(self.scale, start, stop)
        stored = self._stored_rows(start, stop)
        ws = workspace
        if self.native is not None:
            # bfloat16 straight from the codes when nothing is left to add in float32 (the cast rounds the same)
            direct = dtype == torch.bfloat16 and not lay.hadamard_size and not (svd and self.up is not None)
            out_dtype = torch.bfloat16 if direct else torch.float32
            slot = "cast" if direct else "decode"
            out = ws.get(slot, numel, out_dtype, stored.device) if ws is not None else \
                torch.empty(numel, dtype=out_dtype, device=stored.device)
            self.native.decode(self.units.reshape(-1), lay.dtype, start * self.per_row, numel, self.scale.reshape(-1),
                               self.zero_point.reshape(-1) if self.zero_point is not None else None, self.group, out,
                               lut=self.lut)
            w = out
        elif lay.codebook:
            idx = codec.decode_codes(stored, lay.dtype, shape, out_dtype=torch.float32).long()
            axis = codec.reduction_axis(lay)
            w = scale[idx] if scale.ndim == 1 else torch.gather(
                scale.expand(*codec._expand_for_gather(scale.shape, idx.shape, axis)), axis, idx)
        else:
            out = ws.get("decode", numel, scale.dtype, stored.device) if ws is not None else None
            scratch = ws.get("scratch", 2 * stored.numel() * stored.element_size(), torch.uint8, stored.device) \
                if ws is not None else None
            w = codec.decode_codes(stored, lay.dtype, shape, legacy_subnormals=lay.legacy_float_subnormals,
                                   out_dtype=scale.dtype, out=out, scratch=scratch)
            fresh = lay.dtype.kind != "native" or stored.dtype != scale.dtype  # else w is the stored tensor
            if self.zero_point is not None:
                zero_point = self._rows(self.zero_point, start, stop)
                w = torch.addcmul(zero_point, w, scale, out=w) if fresh else torch.addcmul(zero_point, w, scale)
            else:
                w = w.mul_(scale) if fresh else w * scale
        w = w.reshape(stop - start, *lay.weight_shape[1:])
        if svd and self.up is not None:
            w = _cast(w, self.up.dtype, ws, "svd").addmm_(self.up[start:stop], self.down)
        w = _cast(w, dtype, ws, "cast")
        if lay.hadamard_size:
            w = hadamard.rotate(w, lay.hadamard_size, legacy=lay.hadamard_legacy)
        return w


def _cast(w: torch.Tensor, dtype: torch.dtype, ws: Workspace | None, slot: str) -> torch.Tensor:
    if w.dtype == dtype:
        return w
    if ws is None:
        return w.to(dtype)
    return ws.get(slot, w.numel(), dtype, w.device).view(w.shape).copy_(w)


class Workspace:
    """Block buffers reused from block to block and layer to layer. Fresh memory for every block costs an
    allocation and ~1000 page faults (a third of a block's decode time); these buffers are as large as the
    largest block (about ``chunk_mb``, a few MB), once per thread."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}

    def get(self, slot: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (slot, dtype, device)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel:
            # A normal tensor even when first made inside torch.inference_mode(): an inference tensor could not be
            # written by a later forward that runs outside it (e.g. under no_grad).
            with torch.inference_mode(False):
                buf = torch.empty(numel, dtype=dtype, device=device)
            self._buffers[key] = buf
        return buf[:numel]


_LOCAL = threading.local()


def thread_workspace() -> Workspace:
    """This thread's :class:`Workspace` (forwards on other threads get their own)."""
    ws = getattr(_LOCAL, "workspace", None)
    if ws is None:
        ws = _LOCAL.workspace = Workspace()
    return ws


def row_blocks(rows: int, align: int, row_bytes: int, chunk_mb: float) -> Iterator[tuple[int, int]]:
    """``[start, stop)`` blocks of about ``chunk_mb`` dense MB, multiples of ``align``, none under MIN_ROWS."""
    step = max(MIN_ROWS, int(chunk_mb * 2**20) // max(row_bytes, 1))
    # blocks of equal height: a thin last block multiplies at a fraction of the speed (3072 rows as 1365 + 1365 +
    # 342: 1.44x the dense bfloat16 time; as 3 x 1024: 1.09x, measured at 64 tokens)
    step = -(-rows // max(1, rows // step))
    step = -(-step // align) * align
    start = 0
    while start < rows:
        stop = min(rows, start + step)
        if rows - stop < MIN_ROWS:  # a thin last block would use other BLAS kernels: merge it
            stop = rows
        yield start, stop
        start = stop


def block_megabytes(chunk_mb: float, x: torch.Tensor) -> float:
    """Block size for an input: ``chunk_mb``, raised towards 4x the input's size (at most 4x ``chunk_mb``).
    BLAS repacks the whole input for every block's product; with 192 tokens of 9216 features (7 MB) and 8 MB
    blocks that repacking cost a third of the layer's time."""
    x_mb = x.numel() * x.element_size() / 2**20
    return min(max(chunk_mb, 4 * x_mb), 4 * chunk_mb)


# ---------------------------------------------------------------------------------------------------------- forward
def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling())


def whole_weight_natively(weight: torch.Tensor) -> bool:
    """Whether ``dequantize_weight()`` may use the compiled decoder: CPU tensors, outside torch.compile."""
    return weight.device.type == "cpu" and not _compiling() and native.enabled_by_env()


def dense_weight(layout: LayerLayout, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype, *, svd: bool = True,
                 workspace: Workspace | None = None) -> torch.Tensor:
    """The layer's whole dense weight, bit-identical to ``codec.dequantize(layout, tensors, dtype)`` (``svd=False``:
    without the SVD product), by the fastest exact path for the tensors' device: the Triton kernels on CUDA, the
    compiled decoder on CPU, the torch codec otherwise. With a ``workspace`` the result may live in its buffers
    (valid until the next call with that workspace)."""
    weight = tensors.get("weight")
    if weight is not None and weight.device.type == "cuda" and triton_decode.available():
        w = triton_decode.dequantize(layout, tensors, dtype, svd=svd, workspace=workspace)
        if w is not None:
            return w
    align = row_alignment(layout)
    if weight is not None and align is not None and (whole_weight_natively(weight) or not svd):
        try:
            decoder = RowDecoder(layout, tensors, use_native=whole_weight_natively(weight))
        except KeyError:  # a missing companion: the codec below names it
            decoder = None
        if decoder is not None and (decoder.native is not None or not svd):
            return decoder.rows(0, layout.weight_shape[0], dtype, svd=svd, workspace=workspace)
    return codec.dequantize(layout, tensors, dtype)


def _options(layer: nn.Module) -> ForwardOptions:
    return getattr(layer, "sdnq_forward_options", None) or DEFAULT_OPTIONS


def _cached_weight(layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    weight = layer.weight
    key = (dtype, weight.device, weight.data_ptr(), weight._version)
    cached = layer.__dict__.get("_sdnq_dense_cache")
    if cached is None or cached[0] != key:
        with torch.inference_mode(False):  # usable by later forwards outside inference mode, autograd included
            cached = (key, layer.dequantize_weight(dtype))
        layer.__dict__["_sdnq_dense_cache"] = cached
    return cached[1]


def _blocked_linear(x: torch.Tensor, decoder: RowDecoder, blocks: list[tuple[int, int]], dtype: torch.dtype,
                    bias: torch.Tensor | None, svd: bool) -> torch.Tensor:
    """``F.linear`` over row blocks. Each block's product is computed the way ``F.linear`` computes it (``addmm``
    with the bias for contiguous inputs, else matmul then bias), so every output element is bit-identical."""
    rows = decoder.rows_total
    if x.dim() <= 2 or x.is_contiguous():  # F.linear folds these into one addmm: write blocks into its output
        x2 = x.reshape(-1, x.shape[-1])
        y = torch.empty(*x.shape[:-1], rows, dtype=dtype, device=x.device)
        y2 = y.view(-1, rows)
        ws = thread_workspace()
        for start, stop in blocks:
            w = decoder.rows(start, stop, dtype, svd=svd, workspace=ws).t()
            if bias is None:
                torch.mm(x2, w, out=y2[:, start:stop])
            else:
                torch.addmm(bias[start:stop], x2, w, out=y2[:, start:stop])
        return y
    parts = [F.linear(x, decoder.rows(start, stop, dtype, svd=svd), bias[start:stop] if bias is not None else None)
             for start, stop in blocks]
    return torch.cat(parts, dim=-1)


def _low_rank(layout: LayerLayout, opts: ForwardOptions) -> bool:
    """Whether the SVD correction runs as a branch on the activations (see the module doc)."""
    return bool(opts.svd == "activations" and layout.svd_rank and not layout.hadamard_size
                and row_alignment(layout) is not None)


def _svd_branch(x: torch.Tensor, tensors: Mapping[str, torch.Tensor], layout: LayerLayout) -> torch.Tensor:
    """``(x @ svd_downᵀ) @ svd_upᵀ`` with the factors as the codec orients them."""
    up, down = tensors["svd_up"], tensors["svd_down"]
    if layout.svd_transposed:  # contiguous like the codec's: BLAS may sum differently for transposed operands
        up, down = up.t().contiguous(), down.t().contiguous()
    return F.linear(F.linear(x, down.to(x.dtype)), up.to(x.dtype))


def _needs_grad(x: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))


def use_quantized_matmul(layer: nn.Module, x: torch.Tensor, opts: ForwardOptions, min_tokens: int) -> bool:
    """Whether this forward goes through the quantized matmul: switched on (or saved with it and not switched
    off), the layer allows it, enough input rows, no autograd, not under torch.compile, on CPU or CUDA."""
    saved = layer.sdnq_layout.options.use_quantized_matmul
    wanted = saved if opts.quantized_matmul is None else opts.quantized_matmul
    if not wanted or x.device.type not in ("cpu", "cuda") or _compiling():
        return False
    if qmatmul.tokens_of(x) < min_tokens or not qmatmul.eligible(layer, switched_on=not saved):
        return False
    return not _needs_grad(x, layer.bias)


def linear_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, layer.dequantize_weight(x.dtype), bias)``, computed block by block (see the module doc).

    When autograd needs the input's gradient the whole weight is decoded as before (backward sums over all
    output features in one matmul, and autograd keeps the weight anyway), so gradients stay exact too."""
    opts = _options(layer)
    if use_quantized_matmul(layer, x, opts, qmatmul.MIN_TOKENS):  # issue 17: see layers/qmatmul.py
        return qmatmul.linear(layer, x, opts.quantized_matmul_cache)
    dtype = x.dtype if x.is_floating_point() else layer.compute_dtype
    x = x.to(dtype)
    bias = layer.bias.to(dtype) if layer.bias is not None else None
    if opts.cache:
        return F.linear(x, _cached_weight(layer, dtype), bias)
    if _compiling():
        return _compiled_linear(layer, x, bias, opts)
    return eager_linear(layer.sdnq_layout, layer.sdnq_tensors(), x, bias, opts)


def eager_linear(layout: LayerLayout, tensors: Mapping[str, torch.Tensor], x: torch.Tensor,
                 bias: torch.Tensor | None, opts: ForwardOptions) -> torch.Tensor:
    """The forward of one quantized linear outside torch.compile (``x`` and ``bias`` already in the compute
    dtype): block-wise on CPU, the whole weight decoded into the thread's workspace on CUDA (Triton), then the
    vendor matmul; the SVD correction as a low-rank branch unless ``opts.svd == "weight"``."""
    dtype = x.dtype
    align = row_alignment(layout)
    low_rank = _low_rank(layout, opts)
    grad = _needs_grad(x, bias)
    # autograd keeps the weight for backward: never hand it a workspace buffer that the next layer overwrites
    workspace = None if grad else thread_workspace()
    whole = align is None or grad or x.device.type != "cpu" or opts.chunk_mb <= 0
    with torch.no_grad():
        if whole:
            w = dense_weight(layout, tensors, dtype, svd=not low_rank, workspace=workspace)
        else:
            rows, width = layout.weight_shape
            decoder = RowDecoder(layout, tensors)
            blocks = list(row_blocks(rows, align, width * x.element_size(), block_megabytes(opts.chunk_mb, x)))
            y = _blocked_linear(x, decoder, blocks, dtype, bias, svd=not low_rank)
    if whole:
        y = F.linear(x, w, bias)
    if low_rank:
        y = y + _svd_branch(x, tensors, layout)
    return y


# ------------------------------------------------------------------------------------------- under torch.compile
_LAYOUT_FIELDS = tuple(f.name for f in dataclasses.fields(LayerLayout) if f.name != "options")  # options: writer-only
_OPTION_FIELDS = tuple(f.name for f in dataclasses.fields(ForwardOptions))


def op_key(layout: LayerLayout, names: tuple[str, ...], opts: ForwardOptions | None) -> str:
    """The operators' key of a layer (:func:`.ops.layer_key`), from the layout's and options' values."""
    fields = tuple((f, _plain(getattr(layout, f))) for f in _LAYOUT_FIELDS)
    options = tuple((f, getattr(opts, f)) for f in _OPTION_FIELDS) if opts is not None else ()
    return ops.layer_key(fields, names, options)


def _plain(value: object) -> object:
    return ("qdtype", value.name) if isinstance(value, QDType) else value


def _compiled_linear(layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None,
                     opts: ForwardOptions) -> torch.Tensor:
    """The forward as the compiler sees it: the decoders as opaque operators (:mod:`.ops`), so the compiled graph
    runs the same kernels as the eager forward. On CPU without autograd the whole block-wise forward is one
    operator; elsewhere the operator decodes the weight and the matmul (and SVD branch) stay in the graph."""
    layout: LayerLayout = layer.sdnq_layout
    names = tuple(k for k, v in layer._parameters.items() if v is not None and k != "bias")
    stored = [layer._parameters[k] for k in names]
    key = op_key(layout, names, opts)
    if (x.device.type == "cpu" and row_alignment(layout) is not None and opts.chunk_mb > 0
            and not _needs_grad(x, bias)):
        return torch.ops.diffusers_sdnq.linear(x, stored, bias, key)
    low_rank = _low_rank(layout, opts)
    y = F.linear(x, torch.ops.diffusers_sdnq.dequantize(stored, key, x.dtype, not low_rank), bias)
    if low_rank:
        y = y + _svd_branch(x, dict(zip(names, stored)), layout)
    return y


def compiled_dense_weight(layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """``dequantize_weight()`` under torch.compile: the decode operator, not a traced codec."""
    names = tuple(k for k, v in layer._parameters.items() if v is not None and k != "bias")
    key = op_key(layer.sdnq_layout, names, None)
    return torch.ops.diffusers_sdnq.dequantize([layer._parameters[k] for k in names], key, dtype, True)
