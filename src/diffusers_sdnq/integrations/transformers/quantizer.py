"""``HfQuantizer`` hooks for pre-quantized SDNQ checkpoints. Every format fact lives in ``format/`` and
``layers/``; this file only connects them to the transformers loader (5.24).

How the loader is kept from damaging the stored tensors:

* The model is already on the meta device when ``_process_model_before_weight_loading`` runs; the dense layers
  that the checkpoint stores quantized are swapped for SDNQ layers whose parameters have the stored names,
  shapes and dtypes. The loader therefore finds every checkpoint key in the model (nothing missing or
  unexpected) with the right shape (no mismatch), and it never casts integer tensors.
* Float companions (scale, zero_point, svd_up, svd_down, ...) are declared with their final dtype (float32
  when ``dequantize_fp32``), and :meth:`SDNQHfQuantizer.get_new_dtype` returns exactly that dtype for them, so
  neither ``dtype=`` nor a keep-in-fp32 plan changes them.
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Any

import torch
from transformers.quantizers.base import HfQuantizer

from ...format.errors import SDNQConfigError
from ..config_args import config_fields, is_from_reference, note_other_implementation
from ..offload import OffloadStash
from ..upstream import check_library
from .config import SDNQTransformersConfig

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class SDNQHfQuantizer(HfQuantizer):
    """Loads SDNQ checkpoints (``quant_method`` "sdnq" / "sdnq_training") into :mod:`diffusers_sdnq.layers`."""

    requires_calibration = False

    def __init__(self, quantization_config: Any, **kwargs: Any) -> None:
        check_library("transformers")
        if is_from_reference(quantization_config):
            note_other_implementation(f"it was given a {type(quantization_config).__module__}.SDNQConfig")
        if not isinstance(quantization_config, SDNQTransformersConfig):  # any config carrying SDNQ fields
            quantization_config = SDNQTransformersConfig.from_dict(config_fields(quantization_config))
        super().__init__(quantization_config, **kwargs)
        self._param_dtypes: dict[str, torch.dtype] = {}
        self.sdnq_offload = OffloadStash()  # disk offload (integrations/offload.py)

    # ------------------------------------------------------------------ checks
    def validate_environment(self, *args: Any, device_map: Any = None, **kwargs: Any) -> None:
        self.sdnq_offload.record_device_map(device_map)  # the resolved map, for device_map="auto"
        if not self.pre_quantized:  # quantize-on-load: fail on unwritable options before any weight is read
            from ...quantize import check_can_quantize, writer_config

            check_can_quantize(writer_config(self.quantization_config.to_dict()))

    # ------------------------------------------------------------------ model surgery
    def _process_model_before_weight_loading(self, model: PreTrainedModel, dtype: Any = None,
                                             checkpoint_files: list[str] | None = None, device_map: Any = None,
                                             **kwargs: Any):
        self.sdnq_offload.record_device_map(device_map)
        if not self.pre_quantized:  # quantize-on-load (quantize_ops.py)
            from .quantize_ops import prepare_on_the_fly

            prepare_on_the_fly(self, model, dtype)
            mark_stored_initialised(model)
            return model
        from ...layers.replace import (
            check_checkpoint_paths,
            plan_model,
            read_checkpoint_headers,
            replace_with_sdnq_layers,
        )

        files = [f for f in checkpoint_files or () if str(f).endswith(".safetensors")]
        stored = where = None
        check_checkpoint_paths(files)
        if files:
            stored, where = read_checkpoint_headers(files)
            stored, where = _align_to_model(model, stored, where)
        plans = plan_model(model, self.quantization_config.sdnq_config, stored=stored, where=where)
        _check_tied(model, plans, stored)
        by_dtype: dict[torch.dtype, dict] = defaultdict(dict)
        for name, layout in plans.items():
            dense_dtype = model.get_submodule(name).weight.dtype
            by_dtype[dtype if isinstance(dtype, torch.dtype) else dense_dtype][name] = layout
        for compute_dtype, group in by_dtype.items():
            replace_with_sdnq_layers(model, group, compute_dtype)
        self._param_dtypes = {
            f"{name}.{key}": param.dtype
            for name in plans
            for key, param in model.get_submodule(name).named_parameters(recurse=False)
            if key != "bias"
        }
        mark_stored_initialised(model)
        return model

    def _process_model_after_weight_loading(self, model: PreTrainedModel, **kwargs: Any):
        from ...layers.replace import release_file_mappings, warn_non_finite

        warn_non_finite(model)
        release_file_mappings(model)
        self.sdnq_offload.write(model)  # quantize-on-load packed weights of disk-offloaded layers
        from ...quantize import install_atomic_save

        session = getattr(self, "sdnq_session", None)
        if session is not None:  # quantize-on-load: record what was skipped and chosen, for save_pretrained
            from .quantize_ops import store_config

            store_config(self.quantization_config, session.finish())
            self.sdnq_session = None
        install_atomic_save(model)  # save_pretrained: atomic, plus quantization_config.json
        from ...layers import install_parameter_count

        install_parameter_count(model)  # num_parameters(): the dense model's count
        return model

    # ------------------------------------------------------------------ quantize-on-load (transformers 5.x)
    def param_needs_quantization(self, model: PreTrainedModel, param_name: str, **kwargs: Any) -> bool:
        from .quantize_ops import needs_quantization

        return needs_quantization(self, model, param_name)

    def get_quantize_ops(self):
        from .quantize_ops import SDNQQuantize

        return SDNQQuantize(self)

    def param_element_size(self, model: PreTrainedModel, param_name: str, param: torch.Tensor) -> float:
        """device_map="auto" sizes a layer to be quantized on load by its packed bytes, not the dense placeholder's."""
        from ...layers import SDNQLayerMixin

        module_name, _, tensor_name = param_name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        if isinstance(module, SDNQLayerMixin):
            return module.stored_element_size(tensor_name, param)
        return super().param_element_size(model, param_name, param)

    def get_new_dtype(self, converter, param, dtype: torch.dtype | None) -> torch.dtype | None:
        targets = getattr(converter, "target_patterns", None) or ()
        stored = self._param_dtypes.get(targets[0]) if len(targets) == 1 else None
        if stored is not None:
            return stored if stored.is_floating_point else None
        return super().get_new_dtype(converter, param, dtype)

    def _dequantize(self, model: PreTrainedModel, dtype: torch.dtype | None = None):
        from ...layers.replace import dequantize_model

        return dequantize_model(model)

    # ------------------------------------------------------------------ flags
    def is_serializable(self) -> bool:
        return True  # the layers' parameters are the stored tensors under the stored names

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_compileable(self) -> bool:
        return True  # the layers' forward is plain torch ops: torch.compile(fullgraph=True) traces it


def mark_stored_initialised(model: torch.nn.Module) -> None:
    """Tell transformers' weight initialisation to leave the SDNQ layers' stored tensors alone.

    transformers initialises every parameter that the loader did not assign (``_initialize_missing_keys`` →
    ``_init_weights``, guarded per tensor by ``_is_hf_initialized``). Disk-offloaded parameters are written to the
    offload folder instead of being assigned, so they reach that step still on the meta device, and ``normal_`` on a
    packed integer tensor fails. The stored tensors have no initial distribution: they come from the checkpoint
    (missing ones are refused while planning, from the safetensors headers) or from the dense weight being
    quantized, so they are marked initialised, as bitsandbytes, quanto and torchao mark their packed parameters.
    """
    from ...layers import SDNQLayerMixin

    for module in model.modules():
        if isinstance(module, SDNQLayerMixin):
            for name, param in module.named_parameters(recurse=False):
                if name != "bias":
                    param._is_hf_initialized = True


def _align_to_model(model: torch.nn.Module, stored: dict, where: dict) -> tuple[dict, dict]:
    """Rename checkpoint keys to the model's module names where only ``base_model_prefix`` differs
    (a base model loaded from a checkpoint of its head model, or the reverse)."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    if not prefix:
        return stored, where
    names = {n for n, _ in model.named_modules()}
    out_stored, out_where = {}, {}
    for key, meta in stored.items():
        module = key.rpartition(".")[0]
        new = key
        if module not in names:
            if module.startswith(prefix + ".") and module[len(prefix) + 1:] in names:
                new = key[len(prefix) + 1:]
            elif f"{prefix}.{module}" in names:
                new = f"{prefix}.{key}"
        out_stored[new] = meta
        out_where[new] = where[key]
    return out_stored, out_where


def _check_tied(model: torch.nn.Module, plans: dict, stored: dict | None) -> None:
    """Refuse a tied pair that the loader would tie across a quantized and a dense layer.

    When the checkpoint holds both sides, transformers ties them only if the stored tensors are equal, so
    that case is left to it; when one side is missing it would alias the dense weight to packed codes."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    for target, source in tied.items():
        t_mod, s_mod = target.rpartition(".")[0], source.rpartition(".")[0]
        if (t_mod in plans) == (s_mod in plans):
            continue
        if stored is not None and target in stored and source in stored:
            continue
        quantized, dense = (s_mod, t_mod) if s_mod in plans else (t_mod, s_mod)
        raise SDNQConfigError(
            f"'{target}' is tied to '{source}', but the SDNQ checkpoint stores '{quantized}' quantized and "
            f"'{dense}' is dense{' and absent' if stored is not None else ''}; a dense layer cannot share packed "
            "SDNQ codes. Re-quantize with the tied layers skipped (the sdnq default, add_skip_keys=True)."
        )
