"""Every private or internal symbol of diffusers, transformers, accelerate and PEFT that diffusers-sdnq patches,
overrides or reads, in one table, each with what we rely on.

Public API needs no listing; what is here is what an upstream release may change without notice: module
globals we overwrite, methods we wrap, quantizer hooks we override (an override of a hook the base class no longer
calls would silently do nothing), attributes of objects we reach into. Code that uses one of these goes through
:func:`resolve` (or :func:`require_attrs` for attributes of live objects), which raises
:class:`UpstreamChangedError` naming the library, its installed version, the symbol and what we expected; the
quantizers check their library's table when they are created (:func:`check_library`), so a changed upstream
fails when a model is loaded, never by loading garbage. ``tests/test_upstream_symbols.py`` checks the whole table
against the installed versions; ``docs/compatibility.md`` lists it for readers.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import inspect
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


class UpstreamChangedError(RuntimeError):
    """An upstream library no longer has a private symbol diffusers-sdnq relies on, or it changed shape."""


@dataclass(frozen=True)
class Symbol:
    """One upstream symbol: ``path`` is ``"package.module:Attr.attr"``; ``kind`` is what we need it to be."""

    library: str
    path: str
    kind: str
    """``dict`` · ``staticmethod`` · ``classmethod`` · ``function`` (plain function or method) · ``class`` ·
    ``property`` · ``hook`` (a method of a base class that we override and the library calls) · ``member`` (any)."""
    use: str
    """How we use it: ``overwritten`` · ``wrapped`` · ``overridden`` · ``subclassed`` · ``read`` · ``called``."""
    expect: str
    since: str | None = None
    """The first release of ``library`` that has it; older supported releases do without (tested at the minimum)."""


_D, _T, _A, _P = "diffusers", "transformers", "accelerate", "peft"

SYMBOLS: tuple[Symbol, ...] = (
    # ---------------------------------------------------------------- diffusers
    Symbol(_D, "diffusers.quantizers.auto:AUTO_QUANTIZER_MAPPING", "dict", "overwritten",
           "a dict quant_method -> quantizer class, read at each from_pretrained; our entries replace 'sdnq'"),
    Symbol(_D, "diffusers.quantizers.auto:AUTO_QUANTIZATION_CONFIG_MAPPING", "dict", "overwritten",
           "a dict quant_method -> config class, read at each from_pretrained"),
    Symbol(_D, "diffusers.quantizers.quantization_config:QuantizationMethod.SDNQ", "member", "read",
           "the 'sdnq' member of the QuantizationMethod enum"),
    Symbol(_D, "diffusers.configuration_utils:ConfigMixin.load_config", "classmethod", "wrapped",
           "a classmethod returning the config dict (first item when a tuple); models read quantization_config.json"),
    *(Symbol(_D, f"diffusers.quantizers.base:DiffusersQuantizer.{hook}", "hook", "overridden", doc) for hook, doc in (
        ("maybe_update_loaded_keys", "called with the checkpoint file list before the model is preprocessed"),
        ("maybe_update_state_dict", "called with each shard's state dict before it is loaded (disk offload)"),
        ("check_if_quantized_param", "asked for each loaded tensor whether create_quantized_param stores it"),
        ("create_quantized_param", "stores a tensor that check_if_quantized_param claimed"),
        ("check_quantized_param_shape", "asked instead of raising when a stored shape differs from the model's"),
        ("update_missing_keys", "filters the missing-key report"),
        ("adjust_target_dtype", "the dtype device_map='auto' sizes parameters with"),
        ("get_special_dtypes_update", "per-parameter dtypes for device_map='auto' (accelerate special_dtypes)"),
        ("adjust_max_memory", "scales max_memory for device_map='auto'"),
        ("update_torch_dtype", "returns the dtype the model is built in"),
        ("validate_environment", "called with the final device_map before weights are read"),
    )),
    Symbol(_D, "diffusers.loaders.lora_pipeline:FluxLoraLoaderMixin._calculate_module_shape", "staticmethod",
           "wrapped", "staticmethod (model, base_module=None, base_weight_param_name=None) -> weight shape"),
    Symbol(_D, "diffusers.loaders.lora_pipeline:_maybe_dequantize_weight_for_expanded_lora", "function", "wrapped",
           "function (model, module) -> dense weight, used when a Flux LoRA widens a layer"),
    # ---------------------------------------------------------------- transformers
    Symbol(_T, "transformers.quantizers.auto:AUTO_QUANTIZER_MAPPING", "dict", "overwritten",
           "a module-global dict quant_method -> quantizer class, read at each from_pretrained (we pin our entry)"),
    Symbol(_T, "transformers.quantizers.auto:AUTO_QUANTIZATION_CONFIG_MAPPING", "dict", "overwritten",
           "a module-global dict quant_method -> config class"),
    Symbol(_T, "transformers.configuration_utils:PreTrainedConfig.get_config_dict", "classmethod", "wrapped",
           "a classmethod returning (config_dict, unused_kwargs); configs read quantization_config.json"),
    Symbol(_T, "transformers.core_model_loading:ConversionOps", "class", "subclassed",
           "the base of loader conversion ops: convert(input_dict, full_layer_name=, model=, missing_keys=)"),
    Symbol(_T, "transformers.initialization:normal_", "function", "read",
           "weight initialisation skips tensors flagged _is_hf_initialized (we flag SDNQ stored tensors)"),
    *(Symbol(_T, f"transformers.quantizers.base:HfQuantizer.{hook}", "hook", "overridden", doc) for hook, doc in (
        ("param_needs_quantization", "asked per checkpoint tensor whether the quantize op converts it"),
        ("get_quantize_ops", "returns the ConversionOps that quantizes a dense weight on load"),
        ("param_element_size", "bytes per element used to size device_map='auto'"),
        ("is_compileable", "a property: whether generate() may torch.compile the model"),
    )),
    Symbol(_T, "transformers.quantizers.base:HfQuantizer.get_new_dtype", "hook", "overridden",
           "the dtype a pre-quantized tensor is loaded in (None: keep); before 5.21 the loader keeps the declared "
           "dtype of SDNQ tensors by itself", since="5.21.0"),
    # ---------------------------------------------------------------- accelerate
    Symbol(_A, "accelerate.utils:offload_weight", "function", "called",
           "offload_weight(tensor, name, folder, index) writes name.dat and the index entry, keeping the dtype"),
    Symbol(_A, "accelerate.utils:save_offload_index", "function", "called",
           "save_offload_index(entries, folder) merges entries into folder/index.json"),
    Symbol(_A, "accelerate.utils:PrefixedDataset", "class", "read",
           "an offload hook's weights_map: .dataset (the loader) and .prefix (the module's name + '.')"),
    Symbol(_A, "accelerate.utils:OffloadedWeightsLoader", "class", "read",
           "serves offloaded tensors from .state_dict, else from .index entries (.dat files in .save_folder)"),
    Symbol(_A, "accelerate.utils.modeling:dtype_byte_size", "function", "read",
           "bytes per element of a special_dtypes entry (1.16 reads a fractional .itemsize; older releases round "
           "3/5/6/7-bit codes up, see offload.py)"),
    Symbol(_A, "accelerate.utils:CustomDtype", "class", "read", "INT2 / INT4 members priced at 1/4 and 1/2 byte"),
    # ---------------------------------------------------------------- peft
    Symbol(_P, "peft.tuners.lora.model:LoraModel._create_new_module", "staticmethod", "wrapped",
           "staticmethod (lora_config, adapter_name, target, **kwargs) -> new LoRA module (its dispatcher list)"),
    Symbol(_P, "peft.tuners.lokr.model:LoKrModel._create_new_module", "classmethod", "wrapped",
           "classmethod (config, adapter_name, target, **kwargs) -> new LoKr module"),
    Symbol(_P, "peft.tuners.loha.model:LoHaModel._create_new_module", "classmethod", "wrapped",
           "classmethod (config, adapter_name, target, **kwargs) -> new LoHa module"),
    Symbol(_P, "peft.tuners.tuners_utils:BaseTuner.inject_adapter", "function", "wrapped",
           "inject_adapter(model, adapter_name, ...) wraps target layers (we refuse foreign tuners after it)"),
    Symbol(_P, "peft.tuners.tuners_utils:check_adapters_to_merge", "function", "called",
           "check_adapters_to_merge(layer, adapter_names) -> the adapters still to merge"),
    Symbol(_P, "peft.tuners.lora.layer:Linear.lora_variants", "property", "overridden",
           "a property {sorted tuple of variant names: LoraVariant class} consulted by resolve_lora_variant"),
    Symbol(_P, "peft.tuners.lora.variants:DoraLinearVariant.init", "staticmethod", "wrapped",
           "staticmethod (module, adapter_name, **kwargs) creating the DoRA magnitude vector"),
    Symbol(_P, "peft.tuners.lora.variants:DoraLinearVariant.forward", "staticmethod", "wrapped",
           "staticmethod (module, active_adapter, x, result, **kwargs) -> result with the DoRA term"),
    Symbol(_P, "peft.tuners.lora.dora:DoraLinearLayer.get_weight_norm", "function", "called",
           "get_weight_norm(weight, lora_weight, scaling) -> column norms of weight + scaling * lora_weight"),
    Symbol(_P, "peft.tuners.lycoris_utils:LycorisLayer._available_adapters", "property", "read",
           "the set of adapter names a LoKr/LoHa layer holds"),
    *(Symbol(_P, f"peft.{module}.get_nb_trainable_parameters", "function", "wrapped",
             "get_nb_trainable_parameters() -> (trainable, all) summed over named_parameters(); its total is "
             "corrected to count SDNQ layers at their dense size (print_trainable_parameters reads it)")
      for module in ("peft_model:PeftModel", "mixed_model:PeftMixedModel")),
)

_BY_PATH = {s.path: s for s in SYMBOLS}


@functools.cache
def version_of(library: str) -> str:
    try:
        return importlib.metadata.version(library)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _fail(symbol: Symbol, problem: str) -> UpstreamChangedError:
    return UpstreamChangedError(
        f"{symbol.library} {version_of(symbol.library)}: {symbol.path.replace(':', '.')} {problem}; diffusers-sdnq "
        f"expects {symbol.expect}. This {symbol.library} release changed an internal that diffusers-sdnq relies on: "
        f"install a version in the supported range (docs/compatibility.md) or a diffusers-sdnq that supports it.")


def _lookup(symbol: Symbol) -> Any:
    module_name, _, attrs = symbol.path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise _fail(symbol, f"cannot be imported ({exc})") from None
    parts = attrs.split(".")
    for i, part in enumerate(parts):
        try:  # the raw class attribute for the last step, so staticmethod/classmethod/property stay visible
            obj = inspect.getattr_static(obj, part) if i == len(parts) - 1 and inspect.isclass(obj) \
                else getattr(obj, part)
        except AttributeError:
            raise _fail(symbol, "does not exist") from None
    return obj


_KIND_CHECKS = {
    "dict": lambda o: isinstance(o, dict),
    "staticmethod": lambda o: isinstance(o, staticmethod),
    "classmethod": lambda o: isinstance(o, classmethod),
    "function": lambda o: callable(o) and not isinstance(o, type),
    "class": inspect.isclass,
    "property": lambda o: isinstance(o, property),
    "hook": lambda o: callable(o) or isinstance(o, (property, staticmethod, classmethod)),
    "member": lambda o: True,
}


def resolve(path: str) -> Any:
    """The listed symbol ``path`` (raw descriptors for class attributes), checked against its expected kind.

    Raises :class:`UpstreamChangedError` when it is missing or of another kind, and ``KeyError`` for a path that
    is not in :data:`SYMBOLS` (every private symbol must be listed there)."""
    symbol = _BY_PATH[path]
    obj = _lookup(symbol)
    if not _KIND_CHECKS[symbol.kind](obj):
        raise _fail(symbol, f"is now a {type(obj).__name__}, not a {symbol.kind}")
    return obj


def _applies(symbol: Symbol) -> bool:
    """False for a symbol introduced after the installed release of its library (see :attr:`Symbol.since`)."""
    if symbol.since is None:
        return True
    from packaging.version import InvalidVersion, Version

    try:
        return Version(version_of(symbol.library)) >= Version(symbol.since)
    except InvalidVersion:
        return True


def check_library(library: str) -> None:
    """Resolve every listed symbol of ``library`` (cheap: imports it already has); raise on the first change."""
    for symbol in SYMBOLS:
        if symbol.library == library and _applies(symbol):
            resolve(symbol.path)


def problems(libraries: Iterable[str] | None = None) -> list[str]:
    """Every listed symbol that does not resolve in the installed versions, as messages (empty: all fine)."""
    wanted = set(libraries) if libraries is not None else None
    out = []
    for symbol in SYMBOLS:
        if (wanted is not None and symbol.library not in wanted) or not _applies(symbol):
            continue
        try:
            resolve(symbol.path)
        except UpstreamChangedError as exc:
            out.append(str(exc))
    return out


def require_attrs(library: str, obj: Any, attrs: Iterable[str], what: str) -> None:
    """``obj`` (a live upstream object) has every attribute in ``attrs``, or a clear error naming them."""
    missing = [a for a in attrs if not hasattr(obj, a)]
    if missing:
        raise UpstreamChangedError(
            f"{library} {version_of(library)}: the {what} ({type(obj).__module__}.{type(obj).__name__}) has no "
            f"{', '.join(missing)}; diffusers-sdnq reads {', '.join(attrs)} from it. Install a {library} version "
            "in the supported range (docs/compatibility.md).")


def markdown_table() -> str:
    """The table as Markdown (``python -m diffusers_sdnq.integrations.upstream`` prints it for the docs)."""
    rows = ["| library | symbol | kind | how we use it | what we rely on |", "|---|---|---|---|---|"]
    for s in SYMBOLS:
        since = f" (since {s.since})" if s.since else ""
        rows.append(f"| {s.library} | `{s.path.replace(':', '.')}`{since} | {s.kind} | {s.use} | {s.expect} |")
    return "\n".join(rows)


if __name__ == "__main__":  # pragma: no cover - a docs helper
    print(markdown_table())
