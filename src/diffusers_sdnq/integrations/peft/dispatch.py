"""Route PEFT adapters on SDNQ layers to our tuner layers.

PEFT 0.21 has no registry for LoRA backends: ``LoraModel._create_new_module`` (a staticmethod) walks a list of
dispatchers it builds locally, and ``LycorisTuner._create_new_module`` (LoKr/LoHa, a classmethod) maps layer
types. ``SDNQLinear`` subclasses ``nn.Linear``, so without help PEFT's default layers would wrap it: forward
works, but merging would add float deltas to packed integer codes. :func:`install` wraps those factory methods
once (idempotent, version-gated) so an SDNQ base is handled here first and anything else goes to PEFT unchanged.
``LoraConfig._register_custom_module`` cannot do this alone: diffusers' ``load_lora_weights`` and transformers'
``load_adapter`` build their own ``LoraConfig``.

This module imports PEFT only inside functions: :func:`install` may run while PEFT (or one of our modules that
imports it) is still being imported.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import sys
import warnings
from typing import Any

from torch import nn

from ...layers import SDNQLayerMixin, SDNQLinear
from .errors import SDNQAdapterError

logger = logging.getLogger("diffusers_sdnq")

#: Oldest PEFT whose adapter layers we build on (``lora_variants``; LoKr/LoHa ``get_delta_weight(apply_rank_dropout=)``).
MIN_PEFT = "0.21.0"
_MARK = "_diffusers_sdnq_original"


def sdnq_base_of(module: nn.Module) -> SDNQLayerMixin | None:
    """The SDNQ layer under (possibly nested) PEFT tuner layers, or None."""
    while hasattr(module, "base_layer") and callable(getattr(module, "get_base_layer", None)):
        module = module.base_layer
    return module if isinstance(module, SDNQLayerMixin) else None


def _target_name(target: nn.Module, kwargs: dict[str, Any]) -> str:
    return kwargs.get("target_name") or type(sdnq_base_of(target)).__name__


def _refuse_non_linear(target: nn.Module, kind: str, kwargs: dict[str, Any]) -> None:
    base = sdnq_base_of(target)
    if not isinstance(base, SDNQLinear):
        raise SDNQAdapterError(
            f"{kind} on the quantized {type(base).__name__} '{_target_name(target, kwargs)}' is not supported: only "
            "quantized Linear layers take adapters. Leave it out of target_modules, or keep the layer unquantized "
            "(modules_to_not_convert) when quantizing.")


def dispatch_sdnq(target: nn.Module, adapter_name: str, config: Any, parameter_name: str | None = None,
                  **kwargs: Any) -> nn.Module | None:
    """PEFT LoRA dispatcher: an :class:`SDNQLoraLinear` for an SDNQ linear, None for anything else."""
    if sdnq_base_of(target) is None:
        return None
    if parameter_name is not None:
        raise SDNQAdapterError(
            f"target_parameters on the quantized layer '{_target_name(target, kwargs)}' is not supported (its "
            f"'{parameter_name}' holds packed codes); target the module instead.")
    _refuse_non_linear(target, "LoRA", kwargs)
    if config.fan_in_fan_out:
        warnings.warn("fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. "
                      "Setting fan_in_fan_out to False.", stacklevel=2)
        config.fan_in_fan_out = False
    from .lora import SDNQLoraLinear

    return SDNQLoraLinear(target, adapter_name, config=config, **kwargs)


def dispatch_sdnq_lycoris(target: nn.Module, adapter_name: str, config: Any, **kwargs: Any) -> nn.Module | None:
    """LoKr/LoHa counterpart of :func:`dispatch_sdnq` (picks the layer class from the config type)."""
    if sdnq_base_of(target) is None:
        return None
    from peft.tuners.loha.config import LoHaConfig
    from peft.tuners.lokr.config import LoKrConfig

    from .lycoris import SDNQLoHaLinear, SDNQLoKrLinear

    classes = {LoKrConfig: SDNQLoKrLinear, LoHaConfig: SDNQLoHaLinear}
    cls = next((c for k, c in classes.items() if isinstance(config, k)), None)
    if cls is None:
        raise SDNQAdapterError(f"{type(config).__name__} adapters on SDNQ-quantized layers are not supported "
                               f"(target '{_target_name(target, kwargs)}'); LoRA, DoRA, LoKr and LoHa are.")
    _refuse_non_linear(target, type(config).__name__.removesuffix("Config"), kwargs)
    return cls(target, adapter_name=adapter_name, config=config, **kwargs)


def _claimed_by_custom_module(config: Any, target: nn.Module) -> bool:
    """A user's ``LoraConfig._register_custom_module`` mapping for this layer type wins over ours."""
    custom = getattr(config, "_custom_modules", None) or {}
    base = sdnq_base_of(target)
    return any(isinstance(base, key) for key in custom)


def _wrap_lora_model() -> bool:
    from peft.tuners.lora.model import LoraModel

    from ..upstream import resolve

    original = resolve("peft.tuners.lora.model:LoraModel._create_new_module").__func__
    if hasattr(original, _MARK):
        return True

    @functools.wraps(original)
    def _create_new_module(lora_config, adapter_name, target, **kwargs):
        _ensure_shims()
        if not _claimed_by_custom_module(lora_config, target):
            new_module = dispatch_sdnq(target, adapter_name, config=lora_config, **kwargs)
            if new_module is not None:
                return new_module
        return original(lora_config, adapter_name, target, **kwargs)

    setattr(_create_new_module, _MARK, original)
    LoraModel._create_new_module = staticmethod(_create_new_module)
    return True


def _wrap_lycoris(model_cls: type) -> bool:
    from ..upstream import resolve

    current = resolve(f"{model_cls.__module__}:{model_cls.__name__}._create_new_module")
    if hasattr(current.__func__, _MARK):
        return True
    original = current.__func__

    @functools.wraps(original)
    def _create_new_module(cls, config, adapter_name, target, **kwargs):
        new_module = dispatch_sdnq_lycoris(target, adapter_name, config, **kwargs)
        if new_module is not None:
            return new_module
        return original(cls, config, adapter_name, target, **kwargs)

    setattr(_create_new_module, _MARK, original)
    model_cls._create_new_module = classmethod(_create_new_module)
    return True


def check_no_foreign_tuners(model: nn.Module, tuner: str) -> None:
    """Raise when a PEFT tuner we do not handle (IA3, OFT, VeRA, AdaLoRA, ...) wrapped an SDNQ layer.

    Those tuners read or rewrite ``base_layer.weight`` as a dense matrix, which on an SDNQ layer holds packed
    codes: their forward would be wrong or their merge would corrupt the codes.
    """
    for name, module in model.named_modules():
        if (callable(getattr(module, "get_base_layer", None)) and not hasattr(module, "_sdnq_apply_adapter")
                and sdnq_base_of(module) is not None):
            kind = tuner.removesuffix("Model") or type(module).__name__
            raise SDNQAdapterError(
                f"{kind} adapters are not supported on SDNQ-quantized layers (target '{name}', PEFT layer "
                f"{type(module).__module__}.{type(module).__name__}): they treat the packed weight as a dense matrix. "
                "Supported: LoRA (with rsLoRA, lora_bias, DoRA), LoKr and LoHa. Otherwise leave the quantized layers "
                "out of target_modules, or dequantize the model first (diffusers_sdnq.dequantize_model).")


def _wrap_inject_adapter() -> None:
    from peft.tuners.tuners_utils import BaseTuner

    from ..upstream import resolve

    original = resolve("peft.tuners.tuners_utils:BaseTuner.inject_adapter")
    if hasattr(original, _MARK):
        return

    @functools.wraps(original)
    def inject_adapter(self, model, adapter_name, *args, **kwargs):
        result = original(self, model, adapter_name, *args, **kwargs)
        check_no_foreign_tuners(model, type(self).__name__)
        return result

    setattr(inject_adapter, _MARK, original)
    BaseTuner.inject_adapter = inject_adapter


def _wrap_parameter_counts() -> None:
    """PEFT's ``get_nb_trainable_parameters`` (and so ``print_trainable_parameters``) sums ``numel()`` of every
    parameter, special-casing only bitsandbytes' packed 4-bit weights: an SDNQ layer would count its packed codes
    and scales instead of the weights it stands for. The total is corrected to the dense count that
    ``num_parameters()`` reports (:func:`~diffusers_sdnq.layers.count_parameters`); the stored tensors are frozen,
    so the trainable count is PEFT's own."""
    from ...layers.counting import count_parameters
    from ...layers.modules import SDNQLayerMixin
    from ..upstream import resolve

    for path in ("peft.peft_model:PeftModel.get_nb_trainable_parameters",
                 "peft.mixed_model:PeftMixedModel.get_nb_trainable_parameters"):
        original = resolve(path)
        if hasattr(original, _MARK):
            continue

        @functools.wraps(original)
        def get_nb_trainable_parameters(self, *args, _original=original, **kwargs):
            trainable, total = _original(self, *args, **kwargs)
            if any(isinstance(m, SDNQLayerMixin) for m in self.modules()):
                stored = sum(p.numel() for p in self.parameters())
                total += count_parameters(self) - stored
            return trainable, total

        setattr(get_nb_trainable_parameters, _MARK, original)
        module_name, _, attr = path.partition(":")
        getattr(importlib.import_module(module_name), attr.split(".")[0]).get_nb_trainable_parameters = get_nb_trainable_parameters


def install() -> bool:
    """Let PEFT (and diffusers' LoRA loaders) handle SDNQ layers. Idempotent; False when PEFT is absent/too old.

    Run when PEFT is imported (see ``integrations.hooks``) and when diffusers loads an SDNQ model. Only SDNQ
    layers take the new paths; every other layer reaches PEFT's own dispatchers exactly as before. Other PEFT
    tuners that end up on an SDNQ layer are refused right after injection (:func:`check_no_foreign_tuners`).
    """
    if importlib.util.find_spec("peft") is None:
        return False
    import peft
    from packaging.version import Version

    if Version(peft.__version__) < Version(MIN_PEFT):
        from ..upstream import UpstreamChangedError

        raise UpstreamChangedError(f"peft {peft.__version__} is older than {MIN_PEFT}, the oldest release whose LoRA "
                                   "layers diffusers-sdnq can extend; without that, PEFT would wrap SDNQ layers as "
                                   "plain linears and merging would corrupt their packed weights. Upgrade peft "
                                   "(docs/compatibility.md).")
    from ..upstream import check_library

    check_library("peft")  # every PEFT internal the adapters rely on, or a clear error naming the change
    if not _wrap_lora_model():
        return False
    _wrap_inject_adapter()
    _wrap_parameter_counts()
    try:
        from peft.tuners.loha.model import LoHaModel
        from peft.tuners.lokr.model import LoKrModel
    except ImportError:  # pragma: no cover - both ship with every supported peft
        pass
    else:
        _wrap_lycoris(LoKrModel)
        _wrap_lycoris(LoHaModel)
    _ensure_shims()
    return True


def _ensure_shims() -> None:
    """Patch diffusers' Flux LoRA loader if it is fully imported (never imports it: we may be mid-import)."""
    if "diffusers" in sys.modules:
        from .diffusers_loaders import ensure_diffusers_lora_shims

        ensure_diffusers_lora_shims(import_if_missing=False)
