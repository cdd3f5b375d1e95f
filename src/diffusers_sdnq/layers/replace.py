"""Model surgery: decide each layer's layout and swap dense layers for quantized ones, on the meta device.

The decision uses the config (as the reference does) and, when the checkpoint's tensor headers are known,
cross-checks against them: a layer whose ``<name>.scale`` is in the files is quantized, and its stored
shapes must fit the planned layout, or the error names the tensor, the file and what was expected.
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from ..format.config import QuantConfig, warn_unused_patterns
from ..format.errors import SDNQFormatError, SDNQNonFiniteWarning, SDNQShapeError
from ..format.history import resolve_layout, warn_notes
from ..format.layout import LayerLayout, layer_kind_of, plan_layer
from .files import ST_DTYPES as _ST_DTYPES  # noqa: F401 - re-exported for older imports
from .files import TensorMeta, read_safetensors_header
from .modules import SDNQLayerMixin, sdnq_class_for

logger = logging.getLogger("diffusers_sdnq")

def read_checkpoint_headers(files: Iterable[str | os.PathLike]) -> tuple[dict[str, TensorMeta], dict[str, str]]:
    """Headers of several shards merged, plus key → file. A key in two shards is an error naming both."""
    metas: dict[str, TensorMeta] = {}
    where: dict[str, str] = {}
    for file in files:
        if not isinstance(file, (str, os.PathLike)) or not os.fspath(file).endswith(".safetensors"):
            continue
        for key, meta in read_safetensors_header(file).items():
            if key in where:
                raise SDNQFormatError(f"tensor '{key}' is in two checkpoint shards: {where[key]} and "
                                      f"{os.fspath(file)}; the checkpoint is corrupt (re-download it)")
            metas[key] = meta
            where[key] = os.fspath(file)
    return metas, where


def plan_model(model: nn.Module, config: QuantConfig, stored: Mapping[str, TensorMeta] | None = None,
               where: Mapping[str, str] | None = None, keep_dense: Iterable[str] = ()) -> dict[str, LayerLayout]:
    """Layout of every layer that is quantized, keyed by module name."""
    keep = [k for k in keep_dense if k]
    by_module: dict[str, dict[str, TensorMeta]] | None = None
    plans: dict[str, LayerLayout] = {}
    problems: list[str] = []
    version_notes: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, SDNQLayerMixin):
            continue
        cls = sdnq_class_for(module)
        if cls is None:
            continue
        kind = layer_kind_of(cls.__name__)
        param = f"{name}.weight"
        shape = tuple(module.weight.shape)
        if stored is not None:
            quantized = f"{name}.scale" in stored
            if not quantized and param in stored:
                st_shape, st_dtype = stored[param]
                if not st_dtype.is_floating_point or (st_shape != shape and len(st_shape) != len(shape)):
                    file = f" in {where[param]}" if where and param in where else ""
                    problems.append(f"'{param}'{file} is {str(st_dtype).replace('torch.', '')} {list(st_shape)} "
                                    f"but there is no '{name}.scale': it looks quantized yet cannot be decoded")
                continue
            if not quantized:
                continue
        else:
            if config.is_skipped(param) or not config.quantizes_kind(kind) or any(
                k in name.split(".") for k in keep
            ):
                continue
        if stored is not None:
            if by_module is None:  # grouped once: a per-layer scan of every key is quadratic in the header size
                by_module = _keys_by_module(stored)
            keys = by_module.get(name, {})
            file = where.get(f"{name}.scale") if where else None
            try:  # the stored shapes settle what the config leaves open (writing release, lost matmul dtype)
                layout = resolve_layout(config, param, kind, shape, keys, prefix=f"{name}.", source=file,
                                        notes=version_notes)
            except SDNQShapeError as exc:
                problems.append(str(exc))
                continue
        else:
            layout = plan_layer(kind, shape, config.options_for(param, kind))
        plans[name] = layout
    if stored is not None:
        problems += _orphan_companions(model, plans, stored, where)
    _warn_unused_names(model, config)
    warn_notes(version_notes, type(model).__name__)
    if problems:
        head = f"{len(problems)} layer(s) of {type(model).__name__} do not match the SDNQ checkpoint:\n  - "
        raise SDNQShapeError(head + "\n  - ".join(problems))
    return plans


def _warn_unused_names(model: nn.Module, config: QuantConfig) -> None:
    """Exact layer names in a saved config's pattern fields that match no layer of the model: usually a config
    written for another model or edited by hand. Wildcards, single words and root prefixes (which may legitimately
    match nothing in one component of a pipeline) are not reported for a saved config; a config typed by the user
    is checked in full by the writer (``quantize.plan_quantization``)."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    names = []
    for name, module in model.named_modules():  # every weight: the writer records dense norms too
        if isinstance(getattr(module, "weight", None), torch.Tensor) or sdnq_class_for(module) is not None:
            names.append(f"{name}.weight")
            if prefix:  # a checkpoint saved from the model with (or without) its head names layers that way
                names.append(f"{prefix}.{name}.weight")
                if name.startswith(prefix + "."):
                    names.append(f"{name[len(prefix) + 1:]}.weight")
    warn_unused_patterns(config, names, type(model).__name__, exact_only=True, stacklevel=4)


def warn_non_finite(model: nn.Module) -> list[str]:
    """Warn (once per model) about float companions holding NaN/Inf; returns their names. Cheap: companions are
    a small fraction of the packed weight."""
    bad = []
    for name, module in model.named_modules():
        if isinstance(module, SDNQLayerMixin):
            for key, value in module.sdnq_tensors().items():
                if not value.is_floating_point() or value.device.type == "meta":
                    continue
                if not torch.isfinite(value.float() if value.element_size() == 1 else value).all():  # fp8 lacks isfinite
                    bad.append(f"{name}.{key}")
    if bad:
        warnings.warn(f"{type(model).__name__}: {len(bad)} SDNQ tensor(s) hold NaN or Inf, so the weights they scale "
                      f"are NaN/Inf and outputs will be too: {', '.join(bad[:10])}{' ...' if len(bad) > 10 else ''}. "
                      "The checkpoint is damaged (re-download it) or was quantized from a broken model.",
                      SDNQNonFiniteWarning, stacklevel=2)
    return bad


def _file_mappings() -> list[tuple[int, int, bool]]:
    """(start, end, clean) of this process's file-backed memory mappings, sorted; ``clean``: no page of it was
    written to (``Private_Dirty: 0 kB``). Linux ``/proc/self/smaps``; empty elsewhere."""
    ranges: list[tuple[int, int, bool]] = []
    current: list | None = None
    try:
        with open("/proc/self/smaps", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                head = line.split(maxsplit=5)
                if head and "-" in head[0] and len(head) >= 5 and ":" not in head[0]:  # a mapping's header line
                    current = None
                    if len(head) == 6 and head[4] != "0" and head[5].startswith("/"):  # inode != 0: a real file
                        lo, _, hi = head[0].partition("-")
                        current = [int(lo, 16), int(hi, 16), True]
                        ranges.append(current)  # type: ignore[arg-type]
                elif current is not None and line.startswith("Private_Dirty:"):
                    current[2] = line.split()[1] == "0"
    except (OSError, ValueError):
        return []
    return sorted(tuple(r) for r in ranges)  # type: ignore[misc]


@functools.cache
def _madvise():
    """libc's ``madvise`` (Linux), looked up once; None elsewhere."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return None
    fn = ctypes.CDLL(None, use_errno=True).madvise
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return fn


def _drop_pages(start: int, end: int) -> None:
    """Let the kernel drop the resident pages lying wholly inside ``[start, end)`` of a file mapping (Linux
    ``madvise(MADV_DONTNEED)``: pages of a file mapping that were never written are read back from the file if
    anything touches them again, so this only ever costs a re-read)."""
    import mmap

    madvise = _madvise()
    lo, hi = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, end // mmap.PAGESIZE * mmap.PAGESIZE
    if madvise is not None and hi > lo:
        madvise(lo, hi - lo, 4)  # MADV_DONTNEED; failure only costs memory


def release_file_mappings(model: nn.Module) -> int:
    """Copy the SDNQ tensors that live in a mapped checkpoint file no dense tensor of the model uses; returns how
    many were copied.

    safetensors maps each checkpoint file and hands out tensors that point into the mapping. When the model's dense
    parameters were converted on load (a bfloat16 checkpoint loaded in float32), the SDNQ tensors are the only ones
    left in it, and they keep the whole mapping alive: every page read while loading, the converted dense tensors'
    included, stays in the process's memory. Copying the SDNQ tensors lets the mapping go: 18 % less resident
    memory for the float32 Klein-shaped benchmark slice. Each tensor's file pages are dropped as soon as it is
    copied, and first, when no page of the mapping was ever written, the pages the dense conversion read: the
    copies then replace pages instead of adding to them (without that, the full Klein model's fp32 load peaked
    2 GB higher). Where dense tensors still point into a mapping (loaded in their stored dtype), copying would
    only add memory, so that mapping's tensors stay."""
    import bisect

    sdnq = [(module, k, v) for module in model.modules() if isinstance(module, SDNQLayerMixin)
            for k, v in module.sdnq_tensors().items() if v.device.type == "cpu" and v.numel()]
    ranges = _file_mappings() if sdnq else []
    if not ranges:
        return 0
    starts = [lo for lo, _, _ in ranges]

    def mapping(t: torch.Tensor) -> int | None:
        i = bisect.bisect_right(starts, t.data_ptr()) - 1
        return i if i >= 0 and t.data_ptr() < ranges[i][1] else None

    ours = {id(t) for _, _, t in sdnq}
    used_by_dense = {mapping(t) for t in (*model.parameters(), *model.buffers())
                     if id(t) not in ours and t.device.type == "cpu" and t.numel()}
    todo = [(module, name, tensor, where) for module, name, tensor in sdnq
            if (where := mapping(tensor)) is not None and where not in used_by_dense]
    for where in {w for *_, w in todo}:
        lo, hi, clean = ranges[where]
        if clean:  # pages the dense tensors' conversion read: nothing uses them any more
            _drop_pages(lo, hi)
    copies: dict[tuple, nn.Parameter] = {}
    for module, name, tensor, _ in todo:
        ident = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()))
        if ident not in copies:  # a tensor tied between layers stays one tensor
            copies[ident] = nn.Parameter(tensor.detach().clone(), requires_grad=False)
            if tensor.is_contiguous():  # one tensor at a time: the copies never double the model in memory
                _drop_pages(tensor.data_ptr(), tensor.data_ptr() + tensor.numel() * tensor.element_size())
        module._parameters[name] = copies[ident]
    return len(copies)


def check_checkpoint_paths(files: Iterable[str | os.PathLike]) -> None:
    """Every shard of one checkpoint sits in one folder; an index entry with '..' or another folder could make
    the loader read files outside the model (a crafted index)."""
    paths = [os.fspath(f) for f in files if isinstance(f, (str, os.PathLike))]
    escaping = [p for p in paths if ".." in p.replace("\\", "/").split("/")]
    folders = {os.path.dirname(os.path.abspath(p)) for p in paths}
    if escaping or len(folders) > 1:
        shown = escaping or sorted(paths)
        raise SDNQFormatError(f"checkpoint shards must all be plain files in the model folder, got: "
                              f"{', '.join(shown[:5])}; the index file is corrupt or crafted")


def _orphan_companions(model: nn.Module, plans: Mapping[str, LayerLayout], stored: Mapping[str, TensorMeta],
                       where: Mapping[str, str] | None) -> list[str]:
    """SDNQ companion tensors (``x.scale``, ``x.svd_up``, ...) that belong to no quantized layer of the model:
    the checkpoint was made for another architecture or its keys were renamed, so the layer would load wrong."""
    own = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    own |= {f"{name}.{leaf}" for name, module in model.named_modules() if sdnq_class_for(module) is not None
            for leaf in COMPANION_NAMES}  # a quantizable layer's own problems are reported per layer
    orphans: dict[str, list[str]] = {}
    for key in stored:
        module, _, leaf = key.rpartition(".")
        if leaf in COMPANION_NAMES and module not in plans and key not in own:
            orphans.setdefault(where.get(key, "the checkpoint") if where else "the checkpoint", []).append(key)
    return [f"{file} holds SDNQ tensors that match no quantizable layer of the model: "
            + ", ".join(f"'{k}'" for k in sorted(keys)[:10]) + (f" and {len(keys) - 10} more" if len(keys) > 10 else "")
            for file, keys in orphans.items()]


COMPANION_NAMES = frozenset(("scale", "zero_point", "svd_up", "svd_down", "scale_2", "scale_zero_point",
                             "zero_point_scale", "zero_point_2"))


def _keys_by_module(stored: Mapping[str, TensorMeta]) -> dict[str, dict[str, TensorMeta]]:
    """{module name: {tensor's short name: meta}} of every stored tensor, in one pass."""
    out: dict[str, dict[str, TensorMeta]] = {}
    for key, meta in stored.items():
        module, _, leaf = key.rpartition(".")
        out.setdefault(module, {})[leaf] = meta
    return out


def replace_with_sdnq_layers(model: nn.Module, plans: Mapping[str, LayerLayout], compute_dtype: torch.dtype,
                             companion_dtype: torch.dtype | None = None) -> nn.Module:
    """Swap each planned layer for its quantized twin (parameters empty, on the layer's device)."""
    for name, layout in plans.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        dense = getattr(parent, child)
        cls = sdnq_class_for(dense)
        setattr(parent, child, cls.from_module(dense, layout, compute_dtype, companion_dtype))
    return model


def check_fully_loaded(model: nn.Module, files: Iterable[str] = ()) -> None:
    """Raise when the model kept unloaded (meta) tensors: their keys were missing from the checkpoint.

    A model dispatched with offloading (accelerate keeps such tensors elsewhere on purpose) is not checked."""
    device_map = getattr(model, "hf_device_map", None) or {}
    if any(str(v) in ("cpu", "disk") for v in device_map.values()) and len(set(map(str, device_map.values()))) > 1:
        return
    missing = [name for name, param in model.named_parameters() if param.device.type == "meta"]
    if missing:
        shown = ", ".join(f"'{k}'" for k in missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        source = f" ({', '.join(sorted({os.path.basename(f) for f in files}))})" if files else ""
        raise SDNQShapeError(f"{type(model).__name__}: {len(missing)} tensor(s) missing from the SDNQ "
                             f"checkpoint{source}, the model cannot run: {shown}")


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every quantized layer by a plain torch layer holding the dequantized weight."""
    for name, module in list(model.named_modules()):
        if isinstance(module, SDNQLayerMixin):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.dequantize())
    return model


def sdnq_layers(model: nn.Module) -> dict[str, SDNQLayerMixin]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SDNQLayerMixin)}
