"""diffusers ``DiffusersQuantizer`` for SDNQ: hooks only, the work is in ``layers/`` and ``format/``."""

from __future__ import annotations

import copy
from typing import Any

import torch
from diffusers.quantizers.base import DiffusersQuantizer

from ...layers import (
    SDNQLayerMixin,
    assign_stored_tensor,
    dequantize_model,
    install_parameter_count,
    plan_model,
    read_checkpoint_headers,
    replace_with_sdnq_layers,
)
from ..config_args import config_fields, is_from_reference, note_other_implementation
from ..offload import OffloadStash
from ..upstream import check_library
from .config import SDNQDiffusersConfig


def _store_config(target, config) -> None:
    """Copy a writer's final :class:`QuantConfig` into the diffusers config object saved in ``config.json``."""
    target.sdnq = config
    for key, value in config.to_dict().items():
        if key != "quant_method":
            setattr(target, key, value)


def _module_and_name(model: torch.nn.Module, param_name: str) -> tuple[torch.nn.Module, str]:
    module_name, _, tensor_name = param_name.rpartition(".")
    return (model.get_submodule(module_name) if module_name else model), tensor_name


class SDNQDiffusersQuantizer(DiffusersQuantizer):
    """Loads SDNQ checkpoints into :class:`~diffusers_sdnq.layers.SDNQLinear` & co on the meta device."""

    use_keep_in_fp32_modules = True
    requires_calibration = False

    def __init__(self, quantization_config, **kwargs: Any) -> None:
        check_library("diffusers")
        if is_from_reference(quantization_config):
            note_other_implementation(f"it was given a {type(quantization_config).__module__}.SDNQConfig")
        own = isinstance(quantization_config, SDNQDiffusersConfig)
        if not own:  # any config object carrying SDNQ fields (e.g. diffusers.SDNQConfig of the sdnq package)
            quantization_config = SDNQDiffusersConfig.from_dict(config_fields(quantization_config))
        elif not kwargs.get("pre_quantized", True):  # the final choices are recorded in our copy; the caller's
            quantization_config = copy.deepcopy(quantization_config)  # object may quantize other models too
        self._own_model_config = not own or not kwargs.get("pre_quantized", True)
        super().__init__(quantization_config, **kwargs)
        self.checkpoint_files: list[str] = []
        self.torch_dtype: torch.dtype | None = None
        self.sdnq_session = None  # quantize-on-load state (diffusers_sdnq.quantize.QuantizeSession)
        self.sdnq_offload = OffloadStash()  # disk offload (integrations/offload.py)

    def validate_environment(self, *args: Any, device_map: Any = None, **kwargs: Any) -> None:
        self.sdnq_offload.record_device_map(device_map)  # called again with the resolved map before loading
        if not self.pre_quantized:
            from ...quantize import check_can_quantize

            check_can_quantize(self.quantization_config.quant_config())  # quantize-on-load: writable options

    def update_torch_dtype(self, torch_dtype: torch.dtype | None) -> torch.dtype:
        self.torch_dtype = torch_dtype or torch.float32
        return self.torch_dtype

    def adjust_target_dtype(self, target_dtype: torch.dtype) -> torch.dtype:
        return target_dtype  # dense layers are sized in torch_dtype; SDNQ layers by get_special_dtypes_update

    def get_special_dtypes_update(self, model, torch_dtype: torch.dtype) -> dict[str, Any]:
        """device_map="auto" sizes each SDNQ tensor by its stored bytes (packed, for a layer quantized on load)."""
        from ..offload import element_sizes

        return {**super().get_special_dtypes_update(model, torch_dtype), **element_sizes(model)}

    def adjust_max_memory(self, max_memory: dict[str, int | str]) -> dict[str, int | str]:
        return {key: val * 0.9 for key, val in max_memory.items()}

    def maybe_update_loaded_keys(self, loaded_keys: list[str], checkpoint_files: list[str]) -> list[str]:
        from ...layers.replace import check_checkpoint_paths

        self.checkpoint_files = [f for f in checkpoint_files or [] if isinstance(f, str)]
        check_checkpoint_paths(self.checkpoint_files)
        return loaded_keys

    def _process_model_before_weight_loading(self, model, device_map=None, keep_in_fp32_modules=None, **kwargs):
        self._sdnq_model = model  # maybe_update_state_dict has no model argument
        self.sdnq_offload.record_device_map(device_map)
        config = self.quantization_config.quant_config()
        if self.pre_quantized:
            metas, where = read_checkpoint_headers(self.checkpoint_files) if self.checkpoint_files else (None, None)
            plans = plan_model(model, config, metas, where)
            replace_with_sdnq_layers(model, plans, self.torch_dtype or torch.float32)
        else:  # quantize-on-load: plan on meta, then each dense weight is quantized as it arrives
            from ...quantize import QuantizeSession, prepare_model_for_quantization, writer_config

            config = writer_config(config)
            plans = prepare_model_for_quantization(model, config, keep_in_fp32_modules or [], self.torch_dtype)
            self.sdnq_session = QuantizeSession(config, plans, self.torch_dtype or torch.float32,
                                                model_name=type(model).__name__)
            _store_config(self.quantization_config, config)  # saved with the model
        return model

    def maybe_update_state_dict(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Store the tensors of SDNQ layers that a dict ``device_map`` puts on ``"cpu"`` or ``"disk"`` ourselves.

        diffusers never offers those to :meth:`create_quantized_param`: it writes them to an offload folder (disk,
        and cpu too when the map has disk entries) after casting floating-point ones to ``torch_dtype``, so float32
        scales of a bfloat16 model would come back rounded, and a quantize-on-load layer would receive its dense
        weight. Here a dense weight is quantized first; a cpu layer then gets its stored tensors directly, and a
        disk layer's integer tensors go on to the offload folder unchanged while its float ones are written there
        after dispatch (:mod:`..offload`), byte for byte."""
        model = getattr(self, "_sdnq_model", None)
        device_map = self.sdnq_offload.device_map
        if model is None or device_map is None:
            return state_dict
        from ..offload import device_for

        session = self.sdnq_session
        layers = set(session.plans) - session.done if session is not None else \
            {n for n, m in model.named_modules() if isinstance(m, SDNQLayerMixin)}
        for name in sorted(layers):
            device = str(device_for(device_map, name))
            if device not in ("cpu", "disk") or not any(k.rpartition(".")[0] == name for k in state_dict):
                continue
            if device == "cpu":
                for key in [k for k in state_dict if k.rpartition(".")[0] == name]:
                    self._store(model, key, state_dict.pop(key), "cpu")
                continue
            if session is not None and f"{name}.weight" in state_dict:
                from ...quantize import quantize_on_meta

                state_dict.update(quantize_on_meta(model, name, state_dict.pop(f"{name}.weight"), session))
            if not isinstance(model.get_submodule(name), SDNQLayerMixin):  # dynamic quantization kept it dense
                continue
            for key in [k for k in state_dict if k.rpartition(".")[0] == name and not k.endswith(".bias")]:
                if state_dict[key].is_floating_point():
                    self.sdnq_offload.keep(key, state_dict.pop(key))
        return state_dict

    @property
    def supports_parallel_loading(self) -> bool:
        return self.pre_quantized  # a quantize-on-load session handles one layer at a time

    def update_missing_keys(self, model, missing_keys: list[str], prefix: str) -> list[str]:
        session = self.sdnq_session
        if self.pre_quantized or session is None:
            return super().update_missing_keys(model, missing_keys, prefix)
        # quantize-on-load: a layer's scale / zero_point / ... come from its dense weight, not from the file
        made = set(session.plans) | set(session.done)
        return [k for k in missing_keys if k.rpartition(".")[0] not in made or k.rpartition(".")[2] == "bias"]

    def check_if_quantized_param(self, model, param_value, param_name: str, state_dict, **kwargs) -> bool:
        module, tensor_name = _module_and_name(model, param_name)
        return isinstance(module, SDNQLayerMixin) and tensor_name != "bias"

    def check_quantized_param_shape(self, param_name, current_param, loaded_param) -> bool:
        return True  # validated with a precise message in create_quantized_param

    def create_quantized_param(self, model, param_value, param_name, target_device, state_dict,
                               unexpected_keys=None, **kwargs) -> None:
        self._store(model, param_name, state_dict.get(param_name, param_value), target_device)

    def _store(self, model, param_name: str, raw: torch.Tensor, target_device) -> None:
        """Put one checkpoint tensor into its SDNQ layer: stored as read (``raw``: before diffusers' cast of floats
        to ``torch_dtype``), or, quantizing on load, a dense weight quantized into the layer's stored tensors."""
        module, tensor_name = _module_and_name(model, param_name)
        if self.pre_quantized:
            assign_stored_tensor(module, tensor_name, raw, target_device, full_name=param_name)
        else:
            from ...quantize import quantize_into, restore_dense

            module_name = param_name.rpartition(".")[0]
            if not quantize_into(module, tensor_name, raw, target_device, session=self.sdnq_session,
                                 module_name=module_name):  # dynamic quantization found no type good enough
                restore_dense(model, module_name, raw.to(device=target_device, dtype=self.torch_dtype))

    def _process_model_after_weight_loading(self, model, **kwargs):
        from ...layers.replace import check_fully_loaded, release_file_mappings, warn_non_finite

        check_fully_loaded(model, self.checkpoint_files)
        warn_non_finite(model)
        release_file_mappings(model)
        self.sdnq_offload.write(model)  # float stored tensors of disk-offloaded layers
        self._sdnq_model = None
        from ..peft.diffusers_loaders import ensure_diffusers_lora_shims

        ensure_diffusers_lora_shims()  # Flux LoRA loading reads weight shapes: show it the dense ones
        from ...quantize import install_atomic_save

        session = getattr(self, "sdnq_session", None)
        if session is not None:  # quantize-on-load: record what was skipped and chosen, for save_pretrained
            _store_config(self.quantization_config, session.finish())
            self.sdnq_session = None
        if self._own_model_config:  # the model config holds the caller's object: save ours, the final one
            model.register_to_config(quantization_config=self.quantization_config)
        install_atomic_save(model)  # save_pretrained: atomic, plus quantization_config.json
        install_parameter_count(model)  # num_parameters(): the dense model's count
        return model

    def _dequantize(self, model):
        return dequantize_model(model)

    @property
    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_compileable(self) -> bool:
        return True
