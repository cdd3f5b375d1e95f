"""``SDNQLoraLinear``: PEFT's LoRA ``Linear`` on an ``SDNQLinear`` base (plain LoRA, rsLoRA, ``lora_bias``, DoRA).

Forward is PEFT's own: ``base_layer(x)`` runs the quantized layer (dequantize + ``F.linear``, differentiable in
``x``), then the adapters are added at full precision, so gradients reach the adapters while the stored tensors
stay frozen. Only what would touch the stored weight is replaced:

* merge/unmerge requantize instead of ``weight.data += delta`` (see :mod:`.merge`);
* DoRA computes its column norms from the dequantized weight (PEFT would read the packed codes);
* initialisations that rewrite or read the base weight (PiSSA, OLoRA, LoftQ, CorDA, ...) and LoRA variants we
  have not checked are refused with :class:`SDNQAdapterError`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from peft.tuners.lora.config import LoraConfig
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.variants import DoraLinearVariant

from .errors import SDNQAdapterError
from .merge import SDNQMergeMixin

#: LoRA variants (``LoraConfig`` fields) that work on an SDNQ base.
SUPPORTED_VARIANTS = ("use_dora",)


def requested_variants(config: LoraConfig) -> list[str]:
    """Names of the LoRA variants ``config`` asks for, read from the config's field metadata as PEFT does."""
    names = []
    for field in dataclasses.fields(config):
        if field.name == "init_lora_weights":
            names += [v for v in field.metadata.get("lora_variants", ()) if config.init_lora_weights == v]
        elif field.metadata.get("is_lora_variant") and getattr(config, field.name):
            names.append(field.name)
    return names


def check_lora_config(config: LoraConfig, layer_name: str = "") -> None:
    """Refuse, naming the option, what an SDNQ base cannot support; before any adapter tensor is created."""
    where = f" (target '{layer_name}')" if layer_name else ""
    init = config.init_lora_weights
    if not (init is True or init is False or init == "gaussian"):
        raise SDNQAdapterError(
            f"init_lora_weights={init!r} is not supported on SDNQ-quantized layers{where}: it reads or rewrites the "
            "base weight, which is stored quantized. Use init_lora_weights=True (default) or 'gaussian', or "
            "dequantize the model first (diffusers_sdnq.dequantize_model).")
    unsupported = [v for v in requested_variants(config) if v not in SUPPORTED_VARIANTS]
    if unsupported:
        raise SDNQAdapterError(
            f"LoRA variant(s) {unsupported} are not supported on SDNQ-quantized layers{where}. Supported: plain "
            f"LoRA, rsLoRA, lora_bias and DoRA (use_dora=True).")


class SDNQDoraLinearVariant(DoraLinearVariant):
    """DoRA with column norms taken from the dequantized weight (PEFT's own would read the packed codes).

    The dequantized weight is rebuilt on each call and dropped afterwards: keeping a dense copy per layer would
    undo the memory saving of the quantized base. Merging is done by :class:`SDNQLoraLinear.merge`.
    """

    @staticmethod
    def init(module: SDNQLoraLinear, adapter_name: str, **kwargs: Any) -> None:
        with module._sdnq_dense_base(materialize=True):
            DoraLinearVariant.init(module, adapter_name, **kwargs)

    @staticmethod
    def forward(module: SDNQLoraLinear, active_adapter: str, x: torch.Tensor, result: torch.Tensor,
                **kwargs: Any) -> torch.Tensor:
        with module._sdnq_dense_base(materialize=True):
            return DoraLinearVariant.forward(module, active_adapter, x, result, **kwargs)

    @staticmethod
    def merge_safe(module, active_adapter, orig_weight):  # pragma: no cover - SDNQLoraLinear.merge is used
        raise SDNQAdapterError("DoRA merges on SDNQ layers go through SDNQLoraLinear.merge")

    merge_unsafe = merge_safe
    unmerge = merge_safe


class SDNQLoraLinear(SDNQMergeMixin, LoraLinear):
    """LoRA on an ``SDNQLinear``; same adapter names and state-dict keys as on the dense model."""

    def __init__(self, base_layer: torch.nn.Module, adapter_name: str, config: LoraConfig, **kwargs: Any) -> None:
        check_lora_config(config, kwargs.get("target_name", ""))
        self._sdnq_name = kwargs.get("target_name", "")
        super().__init__(base_layer, adapter_name, config=config, **kwargs)

    @property
    def lora_variants(self):
        return {(): None, ("use_dora",): SDNQDoraLinearVariant}

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: LoraConfig, **kwargs: Any) -> None:
        # Also reached directly when a second adapter is added to an existing layer, hence the check here too.
        check_lora_config(config, kwargs.get("target_name", ""))
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def _sdnq_adapters_of(self) -> set[str]:
        return set(self.lora_A.keys())

    def _sdnq_apply_adapter(self, name: str, weight: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
        delta = self.get_delta_weight(name).to(torch.float32)
        if name not in self.lora_variant:
            return weight + delta
        # DoRA: the norm is taken on the unmerged base weight plus this delta, the factor applied to the weight
        # holding the adapters merged before it (PEFT's merge order semantics).
        dora = self.lora_magnitude_vector[name]
        norm = dora.get_weight_norm(original, delta, scaling=1).detach()
        factor = (dora.weight.detach().to(torch.float32) / norm).view(-1, 1)
        return factor * (weight + delta)

    def _sdnq_merge_bias(self, name: str, bias: torch.Tensor | None) -> torch.Tensor | None:
        if not self.lora_bias.get(name):
            return bias
        if bias is None:
            raise RuntimeError("Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias.")
        return bias + self.lora_B[name].bias.detach().to(torch.float32) * self.scaling[name]

    def __repr__(self) -> str:
        return super().__repr__().replace("lora.Linear", f"lora.{type(self).__name__}", 1)
