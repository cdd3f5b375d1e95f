"""Plan every quantized layer of a component from its config and safetensors headers (no weight is read).

SDNQ files carry no per-layer metadata, so each quantized layer's layout is planned from the config and the
dense layer's shape, then cross-checked against the stored tensors (``format.plan_layer`` / ``check_stored``).
The dense shape comes from the model class built on the meta device (exact; no weight is read), or, when the
class cannot be built, from the stored tensors themselves (:mod:`.infer`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..format import LayerLayout, StoredFacts, layer_kind_of
from ..format.config import QuantConfig
from ..format.errors import SDNQFormatError
from ..format.history import resolve_layout
from ..layers.replace import TensorMeta, read_checkpoint_headers
from .checkpoint import CLIError, Component, Target
from .infer import guess_without_config, infer_with_config


@dataclass
class LayerInfo:
    """One quantized layer as stored: its tensors, where they live, and its layout (planned or guessed)."""

    name: str
    kind: str
    dense_shape: tuple[int, ...]
    tensors: dict[str, TensorMeta]
    files: dict[str, str]
    layout: LayerLayout | None = None
    facts: StoredFacts | None = None
    guessed: bool = False

    @property
    def dtype_name(self) -> str:
        if self.layout is not None:
            return self.layout.dtype.name
        if self.facts is not None and self.facts.bits:
            return f"{'u' if self.facts.has_zero_point else ''}int{self.facts.bits}"
        return "unknown"

    @property
    def bits(self) -> int | None:
        if self.layout is not None:
            return self.layout.dtype.bits
        return self.facts.bits if self.facts is not None else None

    @property
    def group_size(self) -> int | None:
        if self.layout is not None:
            return self.layout.group_size
        return self.facts.group_size if self.facts is not None else None

    @property
    def svd_rank(self) -> int:
        if self.layout is not None:
            return self.layout.svd_rank
        return self.facts.svd_rank if self.facts is not None else 0

    @property
    def stored_bytes(self) -> int:
        """Bytes of the stored tensors, bias excluded (it is the same in a dense model)."""
        return sum(tensor_nbytes(meta) for key, meta in self.tensors.items() if key != "bias")

    @property
    def dense_numel(self) -> int:
        return math.prod(self.dense_shape)


@dataclass
class SkippedLayer:
    name: str
    kind: str
    reason: str


@dataclass
class ComponentPlan:
    """Everything the commands need about one component, from headers and config only."""

    component: Component
    headers: dict[str, TensorMeta] = field(default_factory=dict)
    where: dict[str, str] = field(default_factory=dict)
    quant: QuantConfig | None = None
    layers: dict[str, LayerInfo] = field(default_factory=dict)
    plain: list[str] = field(default_factory=list)
    """Stored keys that belong to no quantized layer (biases of quantized layers belong to the layer)."""
    skipped: list[SkippedLayer] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    """Layers with a scale whose tensors do not fit any layout (each has an entry in ``problems``)."""
    shape_source: str = "none"
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def quantized(self) -> bool:
        return bool(self.layers) or self.quant is not None


def tensor_nbytes(meta: TensorMeta) -> int:
    """Bytes of a stored tensor from its (shape, dtype)."""
    shape, dtype = meta
    return math.prod(shape) * dtype.itemsize


@contextlib.contextmanager
def _quiet_hf() -> Iterator[None]:
    """Silence diffusers/transformers info and warnings while building meta models (config key chatter)."""
    import diffusers
    import transformers

    d_level = diffusers.utils.logging.get_verbosity()
    t_level = transformers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers.utils.logging.set_verbosity(d_level)
        transformers.utils.logging.set_verbosity(t_level)


def resolve_class(comp: Component) -> type | None:
    """The model class named by model_index.json or config.json, or None when it cannot be imported."""
    import importlib

    if not comp.class_name or not comp.library:
        return None
    try:
        module = importlib.import_module(comp.library)
    except ImportError:
        return None
    return getattr(module, comp.class_name, None)


def build_meta_model(comp: Component) -> torch.nn.Module:
    """Instantiate the component's model class on the meta device from its config (no weight is read)."""
    cls = resolve_class(comp)
    if cls is None:
        raise CLIError(f"model class {comp.library}.{comp.class_name} is not available")
    config = {k: v for k, v in (comp.config or {}).items() if k != "quantization_config"}
    with _quiet_hf():
        if comp.library == "diffusers" or "_class_name" in config:
            from accelerate import init_empty_weights

            with init_empty_weights():
                return cls.from_config(config)
        from transformers import AutoConfig

        hf_config = AutoConfig.from_pretrained(str(comp.folder))
        if hasattr(hf_config, "quantization_config"):
            del hf_config.quantization_config
        with torch.device("meta"):
            return cls._from_config(hf_config)


def model_layers(model: torch.nn.Module) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Every layer SDNQ could quantize: module name → (layout kind, dense weight shape)."""
    from ..layers.modules import sdnq_class_for

    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, module in model.named_modules():
        cls = sdnq_class_for(module)
        weight = getattr(module, "weight", None)
        if cls is None or not isinstance(weight, torch.Tensor):
            continue
        out[name] = (layer_kind_of(cls.__name__), tuple(weight.shape))
    return out


def _align(name: str, layers: Mapping[str, Any], prefix: str) -> str | None:
    """The model's module name for a checkpoint prefix (only ``base_model_prefix`` may differ)."""
    if name in layers:
        return name
    if prefix and name.startswith(prefix + ".") and name[len(prefix) + 1:] in layers:
        return name[len(prefix) + 1:]
    if prefix and f"{prefix}.{name}" in layers:
        return f"{prefix}.{name}"
    return None


def layer_keys(headers: Mapping[str, TensorMeta], name: str) -> dict[str, TensorMeta]:
    """The direct tensors of module ``name`` (``name.weight``, ``name.scale``, ...), by their short names. Scans
    every key: for many layers use :func:`keys_by_module` once instead."""
    prefix = f"{name}."
    return {k[len(prefix):]: v for k, v in headers.items() if k.startswith(prefix) and "." not in k[len(prefix):]}


def keys_by_module(headers: Mapping[str, TensorMeta]) -> dict[str, dict[str, TensorMeta]]:
    """Every stored tensor grouped by its module: {module name: {short name: meta}}, in one pass (a header of a
    million entries costs a million steps, not a million per layer)."""
    out: dict[str, dict[str, TensorMeta]] = {}
    for key, meta in headers.items():
        module, _, leaf = key.rpartition(".")
        out.setdefault(module, {})[leaf] = meta
    return out

def plan_component(comp: Component, *, use_model: bool = True) -> ComponentPlan:
    """Read a component's headers and config and plan every quantized layer; problems are collected, not raised."""
    plan = ComponentPlan(component=comp, problems=list(comp.problems), notes=list(comp.notes))
    if comp.quant_dict is not None:
        if not comp.is_sdnq:
            plan.notes.append(f"quantized with '{comp.quant_method}', not SDNQ: layers are not described")
            return plan
        try:
            plan.quant = QuantConfig.from_dict(comp.quant_dict, source=comp.quant_source or "quantization_config")
        except ValueError as exc:
            plan.problems.append(str(exc))
            return plan
    if not comp.files:
        return plan
    try:
        plan.headers, plan.where = read_checkpoint_headers(comp.files)
    except SDNQFormatError as exc:
        plan.problems.append(str(exc))
        return plan

    prefixes = sorted({k[: -len(".scale")] for k in plan.headers if k.endswith(".scale")})
    dense: dict[str, tuple[str, tuple[int, ...]]] | None = None
    base_prefix = ""
    if use_model and comp.config is not None and prefixes:
        try:
            model = build_meta_model(comp)
            dense = model_layers(model)
            base_prefix = getattr(model, "base_model_prefix", "") or ""
            plan.shape_source = f"model class {type(model).__name__}"
        except Exception as exc:  # noqa: BLE001 - any failure to build the class falls back to the headers
            plan.notes.append(f"could not build {comp.library}.{comp.class_name} on the meta device ({exc}); "
                              "dense shapes are inferred from the stored tensors")
    if dense is None and prefixes:
        plan.shape_source = "stored tensors" + ("" if plan.quant else " (no config)")

    owned: set[str] = set()
    grouped = keys_by_module(plan.headers)
    for name in prefixes:
        keys = grouped.get(name, {})
        if "weight" not in keys:
            plan.problems.append(f"'{name}.scale' in {plan.where[name + '.scale']} has no '{name}.weight' beside it")
            continue
        module = _align(name, dense, base_prefix) if dense is not None else None
        if dense is not None and module is None:
            plan.notes.append(f"'{name}' has a scale but {comp.class_name} has no quantizable layer of that name; "
                              "its shape is inferred from the stored tensors")
        layer_files = {k: plan.where[f"{name}.{k}"] for k in keys}
        try:
            if plan.quant is not None and module is not None:
                kind, shape = dense[module]
                layout = resolve_layout(plan.quant, f"{name}.weight", kind, shape, keys, prefix=f"{name}.",
                                        source=layer_files["scale"], notes=plan.notes)
                info = LayerInfo(name, kind, shape, keys, layer_files, layout=layout)
            elif plan.quant is not None:
                layout = infer_with_config(name, keys, plan.quant)
                info = LayerInfo(name, layout.kind, layout.weight_shape, keys, layer_files, layout=layout)
            else:
                layout, facts, kind, shape = guess_without_config(name, keys)
                info = LayerInfo(name, kind, shape, keys, layer_files, layout=layout, facts=facts, guessed=True)
        except ValueError as exc:
            message, file = str(exc), layer_files.get("scale") or layer_files["weight"]
            plan.problems.append(message if file in message else f"{message} (file {file})")
            plan.failed.append(name)
            owned.update(f"{name}.{k}" for k in keys)
            continue
        plan.layers[name] = info
        owned.update(f"{name}.{k}" for k in keys)
    plan.plain = [k for k in plan.headers if k not in owned]
    _find_skipped(plan, dense, base_prefix)
    return plan


def _find_skipped(plan: ComponentPlan, dense: Mapping[str, tuple[str, tuple[int, ...]]] | None,
                  base_prefix: str) -> None:
    """Layers SDNQ could have quantized but that are stored dense (or not stored, e.g. tied weights)."""
    quant = plan.quant
    if dense is not None:
        stored_modules = {_align(k.rpartition(".")[0], dense, base_prefix) for k in plan.headers}
        quantized = {_align(n, dense, base_prefix) for n in (*plan.layers, *plan.failed)}
        for name, (kind, _) in dense.items():
            if name in quantized:
                continue
            if name not in stored_modules:
                reason = "not in the files (tied or computed)"
            elif quant is not None and not quant.quantizes_kind(kind):
                reason = f"{kind} layers are not quantized by this config"
            elif quant is not None and quant.is_skipped(f"{name}.weight"):
                reason = "listed in modules_to_not_convert"
            else:
                reason = "stored dense"
                if quant is not None:
                    plan.notes.append(f"'{name}' is stored dense although the config would quantize it (it is "
                                      "not in modules_to_not_convert)")
            plan.skipped.append(SkippedLayer(name, kind, reason))
        return
    for key in plan.plain:
        shape, dtype = plan.headers[key]
        if key.endswith(".weight") and dtype.is_floating_point and len(shape) >= 2:
            name = key[: -len(".weight")]
            listed = quant is not None and quant.is_skipped(key)
            plan.skipped.append(SkippedLayer(name, f"{len(shape)}-D weight",
                                             "listed in modules_to_not_convert" if listed else "stored dense"))


def plan_target(target: Target, *, use_model: bool = True) -> list[ComponentPlan]:
    return [plan_component(c, use_model=use_model) for c in target.components]
