"""Quantizing whole models: which layers, with which layout, one layer at a time.

:func:`plan_quantization` walks a (usually meta-device) model the way the reference quantizer does and decides
every layer: quantized with a :class:`~diffusers_sdnq.format.LayerLayout`, or left dense and recorded in
``modules_to_not_convert``. :class:`QuantizeSession` then turns each dense weight into stored tensors as it
arrives (quantize-on-load: a loader hands over one tensor at a time, so peak memory is the quantized model plus
one dense layer), runs dynamic quantization, shows a progress bar and writes the final choices back into the
config. :func:`quantize_model` does the same for a model that is already in memory.

Devices: with ``quantization_device`` (e.g. ``"cuda"``) each dense weight is moved there, quantized, and the result
kept on ``return_device`` when set, else moved back to where the dense weight came from (or, while loading, where
the loader places the layer). So a model can stay on the CPU while its layers are quantized on the GPU one at a
time: GPU memory then holds one dense layer and its temporaries, not the model.
"""

from __future__ import annotations

import logging
import math
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from ..format import codec
from ..format.config import QuantConfig, warn_unused_patterns
from ..format.dtypes import get_dtype
from ..format.errors import SDNQConfigError, SDNQFormatError, SDNQWarning
from ..format.layout import LayerLayout, layer_kind_of, plan_layer
from ..format.patterns import PatternSet
from ..layers import SDNQLayerMixin, sdnq_class_for
from . import dynamic
from .codes import check_packable
from .skip import GENERIC_SKIP_KEYS, MODEL_SKIP_KEYS, default_skip_keys, merge_keys
from .weight import quantize_weight

logger = logging.getLogger("diffusers_sdnq")

WRITER_SDNQ_VERSION = "0.2.8"
"""The format version this writer produces (``sdnq_version`` in the saved config)."""

_FLOAT_WEIGHTS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_DEFAULT_SKIP_PATTERNS = frozenset(GENERIC_SKIP_KEYS).union(*MODEL_SKIP_KEYS.values())
"""The writer's own skip keys: a config carried over from another model holds them; they are not the user's typos."""


def writer_config(config: QuantConfig | Mapping[str, Any] | None = None, **overrides: Any) -> QuantConfig:
    """A config for writing a new checkpoint: fields not given take the current (0.2.8) defaults.

    (Reading an existing file applies the defaults of the release that wrote it instead; a new file is
    written in the current layout and says so in ``sdnq_version``.)
    """
    data = dict(config.to_dict() if isinstance(config, QuantConfig) else (config or {}))
    data.update(overrides)
    if not data.get("sdnq_version"):
        data["sdnq_version"] = WRITER_SDNQ_VERSION
    data.pop("is_integer", None)
    data.pop("is_unsigned", None)
    parsed = QuantConfig.from_dict(data, source="quantization config")
    if parsed.is_training or parsed.quant_method == "sdnq_training":
        raise SDNQConfigError("quantization_config: training-mode SDNQ models (is_training / sdnq_training) are not "
                              "serializable checkpoints; quantize with is_training=False")
    _check_codebook(parsed.use_codebook, parsed.weights_dtype, "use_codebook", "weights_dtype")
    _check_codebook(parsed.use_codebook_scale and bool(parsed.scale_dtype or parsed.zero_point_dtype),
                    parsed.scale_dtype or parsed.zero_point_dtype, "use_codebook_scale", "scale_dtype")
    return parsed


def _check_codebook(enabled: bool, dtype_name: str | None, flag: str, field: str) -> None:
    """Codebook indices are unsigned integers: refuse other types up front, as the reference does."""
    if not enabled or dtype_name is None:
        return
    dt = get_dtype(dtype_name)
    if not (dt.is_integer and dt.unsigned):
        raise SDNQConfigError(f"quantization_config: {flag} needs an unsigned integer {field} (uint1..uint8), "
                              f"got {dt.name!r}")


def _reduction_size(kind: str, shape: tuple[int, ...]) -> int:
    if kind in ("linear", "conv"):
        return shape[1]
    if kind == "conv_transpose":
        return shape[0]
    return shape[-1]


def plan_quantization(model: nn.Module, config: QuantConfig, keep_dense: Iterable[str] = ()) -> dict[str, LayerLayout]:
    """Decide every layer of ``model``: returns {module name: layout} of the layers to quantize.

    Mutates ``config.modules_to_not_convert`` as the reference does: with ``add_skip_keys`` the model's default
    skip patterns (:mod:`.skip`) and ``keep_dense`` are added, then every layer with a weight that is not
    quantized (unsupported class, conv/embedding without ``quant_conv``/``quant_embedding``, smaller than
    ``minimum_allowed_numel`` or narrower than ``minimum_allowed_channel_size`` along its reduction axis, or a
    shape the chosen type cannot pack) is appended by its full ``.weight`` name, in module order.
    """
    names = [f"{name}.weight" if name else "weight" for name, module in model.named_modules()
             if isinstance(getattr(module, "weight", None), torch.Tensor)]
    warn_unused_patterns(config, names, type(model).__name__, exact_only=False, ignore=_DEFAULT_SKIP_PATTERNS)
    by_module_name = PatternSet(config.modules_to_not_convert, module_names=True)  # the user's own entries
    if config.add_skip_keys:
        config.modules_to_not_convert = merge_keys(config.modules_to_not_convert, default_skip_keys(model),
                                                   [k for k in keep_dense if k])
    plans: dict[str, LayerLayout] = {}
    for name, module in model.named_modules():
        if isinstance(module, SDNQLayerMixin):
            continue
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            continue
        param = f"{name}.weight" if name else "weight"
        if config.is_skipped(param, reference_only=True):
            continue
        if by_module_name.matches(param):
            # a module name the user gave (transformers' convention: the layer, a parent or a dotted suffix), which
            # the reference does not read: record the full name, so every SDNQ loader leaves the layer dense
            config.modules_to_not_convert.append(param)
            continue
        layout = _plan_one(module, param, weight, config)
        if layout is None:
            config.modules_to_not_convert.append(param)
        else:
            plans[name] = layout
    return plans


def _plan_one(module: nn.Module, param: str, weight: torch.Tensor, config: QuantConfig) -> LayerLayout | None:
    cls = sdnq_class_for(module)
    kind = layer_kind_of(cls.__name__) if cls is not None else None
    if kind is None or not config.quantizes_kind(kind) or weight.dtype not in _FLOAT_WEIGHTS:
        return None
    shape = tuple(int(s) for s in weight.shape)
    if math.prod(shape) < config.minimum_allowed_numel or _reduction_size(kind, shape) < \
            config.minimum_allowed_channel_size:
        return None
    try:
        layout = plan_layer(kind, shape, config.options_for(param, kind))
        check_packable(layout.dtype, math.prod(layout.quantized_shape), param)
    except SDNQFormatError as exc:
        logger.warning("diffusers-sdnq: leaving '%s' dense: %s", param, exc)
        return None
    return layout


def _device(value: str | torch.device | int | None) -> torch.device | None:
    if value is None or value == "":
        return None
    if isinstance(value, int):
        return torch.device("cuda", value)
    return torch.device(value)


def progress_bars_enabled() -> bool:
    """Whether long work may show a progress bar: not when ``HF_HUB_DISABLE_PROGRESS_BARS`` is set, nor after
    ``huggingface_hub.utils.disable_progress_bars()``, ``diffusers.utils.logging.disable_progress_bar()`` or
    ``transformers.utils.logging.disable_progress_bar()`` (the libraries' own switches, read when imported)."""
    from huggingface_hub.utils import are_progress_bars_disabled

    if are_progress_bars_disabled():
        return False
    for name in ("diffusers.utils.logging", "transformers.utils.logging"):
        module = sys.modules.get(name)
        check = getattr(module, "is_progress_bar_enabled", None)
        if check is not None and not check():
            return False
    return True


class QuantizeSession:
    """Quantizes the planned layers of one model as their dense weights arrive.

    ``torch_dtype`` is the model dtype (SVD factors, and scales when ``dequantize_fp32`` is off). ``seed`` makes
    the SVD reproducible. With ``progress`` a tqdm bar counts the layers (see :func:`progress_bars_enabled`).
    The config's ``quantization_device`` / ``return_device`` say where each layer is quantized and where its
    stored tensors are kept (see the module doc).
    """

    def __init__(self, config: QuantConfig, plans: Mapping[str, LayerLayout], torch_dtype: torch.dtype,
                 *, seed: int = 0, progress: bool = True, desc: str = "Quantizing (SDNQ)",
                 model_name: str = "the model") -> None:
        self.config = config
        self.model_name = model_name
        self.plans = dict(plans)
        self.torch_dtype = torch_dtype
        self.seed = seed
        self.progress = progress
        self.desc = desc
        self.choices: dict[str, list[str]] = {}
        self.dense: list[str] = []
        self.done: set[str] = set()
        self._bar: Any = None
        self.quantization_device = _device(config.quantization_device)
        self.return_device = _device(config.return_device)

    def result_device(self, default: torch.device | str | int | None) -> torch.device | str | int | None:
        """Where a quantized layer's tensors (and its bias) go: ``return_device`` when set, else ``default``."""
        return self.return_device if self.return_device is not None else default

    # ------------------------------------------------------------------ one layer
    def quantize(self, name: str, dense: torch.Tensor) -> tuple[LayerLayout, dict[str, torch.Tensor]] | None:
        """Layout and stored tensors for layer ``name``; None when dynamic quantization keeps it dense."""
        layout = self.plans[name]
        param = f"{name}.weight"
        source = dense.device
        if self.quantization_device is not None and dense.device != self.quantization_device:
            dense = dense.to(self.quantization_device)
        kw = {"dtype": self.torch_dtype, "seed": self.seed, "svd_steps": self.config.svd_steps,
              "codebook_steps": self.config.codebook_steps}
        try:
            if not self.config.use_dynamic_quantization:
                result: tuple[LayerLayout, dict[str, torch.Tensor]] | None = (layout,
                                                                              quantize_weight(dense, layout, **kw))
            else:
                result = self._dynamic(name, param, dense, layout, kw)
        finally:
            self._tick(name)
        if result is not None:  # back where the dense weight was, or to return_device (a no-op when already there)
            target = self.result_device(source)
            result = (result[0], {k: v.to(target) for k, v in result[1].items()})
        if result is None:
            self.dense.append(param)
            self.config.modules_to_not_convert.append(param)
            self.plans.pop(name, None)
        else:
            self.plans[name] = result[0]
        return result

    def _dynamic(self, name: str, param: str, dense: torch.Tensor, layout: LayerLayout,
                 kw: dict[str, Any]) -> tuple[LayerLayout, dict[str, torch.Tensor]] | None:
        tried: dict[str, tuple[LayerLayout, dict[str, torch.Tensor]]] = {}
        factors: dict[str, torch.Tensor] = {}

        def loss_of(dtype_name: str) -> float | None:
            try:
                lay = plan_layer(layout.kind, layout.weight_shape, replace(layout.options, weights_dtype=dtype_name))
                check_packable(lay.dtype, math.prod(lay.quantized_shape), param)
                tensors = quantize_weight(dense, lay, svd_factors=factors, **kw)
            except SDNQFormatError:
                return None
            tried.clear()
            tried[dtype_name] = (lay, tensors)
            approx = codec.dequantize(lay, tensors, self.torch_dtype)
            return dynamic.relative_variance_error(dense, approx)

        chosen, loss = dynamic.choose(layout.dtype.name, self.config.dynamic_loss_threshold, loss_of)
        if chosen is None:
            logger.info("diffusers-sdnq: no SDNQ type keeps '%s' under the loss threshold (best %.3g); left dense",
                        param, loss)
            return None
        self.choices.setdefault(chosen, []).append(param)
        return tried[chosen]

    # ------------------------------------------------------------------ progress and result
    def _tick(self, name: str) -> None:
        if name in self.done:
            return
        self.done.add(name)
        if self.progress and self._bar is None and self.plans:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=len(self.plans) + len(self.done) - 1, desc=self.desc, unit="layer",
                             disable=not progress_bars_enabled())
        if self._bar is not None:
            self._bar.set_postfix_str(name, refresh=False)
            self._bar.update(1)

    def finish(self) -> QuantConfig:
        """Close the progress bar and write dynamic choices into ``modules_dtype_dict`` (before user entries,
        so they win the first-match rule when the file is read back). Returns the final config."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if not self.plans:
            _warn_nothing_quantized(self.model_name, self.config, self.dense)
        if self.choices:
            merged: dict[str, list[str]] = {k: list(v) for k, v in self.choices.items()}
            for key, names in self.config.modules_dtype_dict.items():
                if key in merged:
                    merged[key] += [n for n in names if n not in merged[key]]
                else:
                    merged[key] = list(names)
            self.config.modules_dtype_dict = merged
            self.choices = {}
        return self.config


def _warn_nothing_quantized(model_name: str, config: QuantConfig, kept_dense: list[str]) -> None:
    """As bitsandbytes and torchao do: a quantization request that quantized nothing is almost always a mistake."""
    if kept_dense:
        why = (f"dynamic quantization found no type under dynamic_loss_threshold={config.dynamic_loss_threshold} "
               f"for any of its {len(kept_dense)} candidate layer(s)")
    else:
        why = ("every layer is skipped (modules_to_not_convert and the default skip keys of add_skip_keys), smaller "
               f"than minimum_allowed_numel={config.minimum_allowed_numel} or narrower than "
               f"minimum_allowed_channel_size={config.minimum_allowed_channel_size}, or of a kind not quantized "
               "(quant_conv / quant_embedding)")
    warnings.warn(f"SDNQ quantization of {model_name} quantized no layer: {why}. The model stays dense.",
                  SDNQWarning, stacklevel=3)


def restore_dense(model: nn.Module, name: str, weight: torch.Tensor) -> nn.Module:
    """Replace quantized layer ``name`` by its original torch class holding ``weight`` (bias kept)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    layer = getattr(parent, child)
    base = next(c for c in type(layer).__mro__[1:] if issubclass(c, nn.Module) and not issubclass(c, SDNQLayerMixin))
    plain = base.__new__(base)
    nn.Module.__init__(plain)
    for key, value in layer.__dict__.items():  # the torch layer's own attributes, none of the SDNQ state
        if key not in ("_parameters", "_buffers", "_modules", "training", "compute_dtype", "save_pretrained") \
                and not key.lstrip("_").startswith("sdnq"):
            plain.__dict__.setdefault(key, value)
    plain.training = layer.training
    plain.weight = nn.Parameter(weight, requires_grad=False)
    plain.bias = layer._parameters.get("bias")
    setattr(parent, child, plain)
    return plain


def set_stored_tensors(layer: SDNQLayerMixin, layout: LayerLayout, tensors: Mapping[str, torch.Tensor],
                       device: torch.device | str | None = None) -> None:
    """Make ``layer`` hold exactly ``tensors`` (its stored parameters) for ``layout``; stale ones are removed."""
    for key in [k for k in layer._parameters if k != "bias" and k not in tensors]:
        del layer._parameters[key]
    for key, value in tensors.items():
        layer._parameters[key] = nn.Parameter(value.to(device) if device is not None else value, requires_grad=False)
    layer.sdnq_layout = layout


def quantize_model(model: nn.Module, config: QuantConfig | Mapping[str, Any] | None = None, *,
                   torch_dtype: torch.dtype | None = None, seed: int = 0, progress: bool = True,
                   **kwargs: Any) -> nn.Module:
    """Quantize a dense model in memory, in place, one layer at a time; returns it.

    ``config`` (or keyword arguments with the reference's field names) selects the options, e.g.
    ``quantize_model(model, weights_dtype="uint4", use_svd=True)``; ``quantization_device="cuda"`` quantizes each
    layer on the GPU while the model stays where it is (``return_device`` moves the quantized layers). The final
    config (with the layers left
    dense and any dynamic choices) is attached as ``model.quantization_config`` and in the model's config, so
    ``save_pretrained`` writes a checkpoint any SDNQ loader reads.
    """
    from ..layers.replace import replace_with_sdnq_layers

    cfg = writer_config(config, **kwargs)
    plans = plan_quantization(model, cfg, getattr(model, "_keep_in_fp32_modules", None) or ())
    session = QuantizeSession(cfg, plans, torch_dtype or _model_dtype(model, plans), seed=seed, progress=progress,
                              model_name=type(model).__name__)
    for name in list(plans):
        dense_layer = model.get_submodule(name)
        weight = dense_layer.weight.detach()
        device = session.result_device(weight.device)
        compute = weight.dtype if weight.dtype in _FLOAT_WEIGHTS[1:] else session.torch_dtype
        result = session.quantize(name, weight)
        if result is None:
            continue
        layout, tensors = result
        replace_with_sdnq_layers(model, {name: layout}, compute)
        layer = model.get_submodule(name)
        set_stored_tensors(layer, layout, tensors, device)
        bias = layer._parameters.get("bias")
        if bias is not None and bias.device != torch.device(device):
            layer._parameters["bias"] = nn.Parameter(bias.to(device), requires_grad=bias.requires_grad)
        del weight, dense_layer
    final = session.finish()
    attach_config(model, final)
    from ..layers import install_parameter_count
    from .save import install_atomic_save

    install_atomic_save(model)
    install_parameter_count(model)
    return model


def _model_dtype(model: nn.Module, plans: Mapping[str, LayerLayout]) -> torch.dtype:
    for name in plans:
        dtype = model.get_submodule(name).weight.dtype
        if dtype in _FLOAT_WEIGHTS[1:]:
            return dtype
    return torch.float32


ConfigAttacher = Callable[[nn.Module, dict[str, Any]], bool]
_CONFIG_ATTACHERS: list[ConfigAttacher] = []


def register_config_attacher(attacher: ConfigAttacher) -> None:
    """Let a library integration record a final config on the models it knows (idempotent).

    ``attacher(model, config_dict)`` returns True when it handled ``model`` (e.g. diffusers' ``register_to_config``
    with its config class); the writer itself knows no library, so the integrations hand this in."""
    if attacher not in _CONFIG_ATTACHERS:
        _CONFIG_ATTACHERS.append(attacher)


def attach_config(model: nn.Module, config: QuantConfig) -> None:
    """Record the final config on ``model`` the way its library saves it (``config.json``), through the attacher
    its integration registered; every model also gets it as ``model.quantization_config`` (a dict)."""
    data = config.to_dict()
    model.quantization_config = data
    for attacher in _CONFIG_ATTACHERS:
        if attacher(model, dict(data)):
            return
