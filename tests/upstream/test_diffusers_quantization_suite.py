"""diffusers' quantization test suites, ported to the SDNQ backend of diffusers-sdnq (tiny offline models, CPU).

Ported from huggingface/diffusers (Apache-2.0), read at main in the code index (``quantization.py`` at
44ef84fa, the per-backend files at the commits the index holds; diffusers 0.42.1 is what runs here):

* ``tests/models/testing_utils/quantization.py`` -- ``QuantizationTesterMixin`` (``_test_quantization_*``),
  ``QuantizationCompileTesterMixin`` and the backend mixins (``BitsAndBytesTesterMixin``, ``QuantoTesterMixin``,
  ``TorchAoTesterMixin``, ``GGUFTesterMixin``, ``ModelOptTesterMixin``). The SDNQ mixins below follow their
  pattern (a config mixin with ``SDNQ_CONFIGS`` + ``_create_quantized_model`` + ``_verify_if_layer_quantized``,
  a tester mixin of parametrized ``test_sdnq_*`` tests, a compile mixin), applied to two model classes.
* ``tests/quantization/sdnq/test_sdnq.py`` (``TestSDNQ``), ``bnb/test_4bit.py`` / ``bnb/test_mixed_int8.py``,
  ``quanto/test_quanto.py``, ``torchao/test_torchao.py``, ``gguf/test_gguf.py``,
  ``test_pipeline_level_quantization.py`` -- the classes of test that apply to a weight-only backend.

Adaptations. The models are the tiny FLUX.1 / FLUX.2-Klein transformers of ``tests/tiny_models.py`` (built
offline); every config passes ``minimum_allowed_numel=0`` because the tiny layers are below SDNQ's default
size limit. Upstream asserts "output is not None / has no NaN" or compares with slices recorded on a GPU; here
every output is compared with an independent computation (``upstream_helpers``): the dense twin (same weights,
dequantized, stock torch forward) and the dense original within the quantization error of the type.
``torch.compile`` uses the ``aot_eager`` backend on CPU (full-graph capture and recompile checks, without
minutes of C++ code generation on two cores); with CUDA the upstream default (inductor) runs.

Upstream tests that do not apply to SDNQ by design (kept here as a list, with the reason):

* ``test_bnb_original_dtype`` / ``_pre_quantization_dtype`` -- ported (``test_sdnq_original_dtype``).
* bnb ``test_moving_to_cpu_throws_warning`` -- checks diffusers' fp16-on-CPU pipeline warning, not the backend.
* bnb ``test_bnb_4bit_wrong_config`` (``bnb_4bit_quant_storage``), ``8bit`` outlier threshold / ``llm_int8_*``
  and ``test_int8_..._skip_modules`` of ``test_mixed_int8.py`` -- bitsandbytes options SDNQ has no equivalent of.
* torchao ``int8dq`` / ``float8dq`` / ``autoquant`` / ``test_int_a8w8_*`` -- activation quantization; SDNQ is
  weight-only (its quantized matmul is an execution option of a weight-only format).
* torchao / bnb ``test_model_memory_usage`` and the quanto ``backend_max_memory_allocated`` footprint override --
  peak accelerator memory during a forward; speed and memory are measured in ``bench/`` (project rule), the
  stored footprint is checked here (``test_sdnq_quantization_memory_footprint``).
* gguf ``from_single_file`` / ``test_gguf_diffusers_format`` / single-file conversions -- SDNQ has no
  single-file format; checkpoints are ``save_pretrained`` folders.
* ``test_pipeline_level_quantization.py::test_raises_error_for_invalid_config`` / ``test_validation_for_mapping``
  -- argument validation inside diffusers' ``PipelineQuantizationConfig``, no backend code runs.
* ``test_torch_compile_utils.py`` (recompilation / graph-break helpers for the bnb/torchao pipelines) -- the
  same checks run through ``SDNQCompileTesterMixin`` (``error_on_recompile``, ``fullgraph=True``).
* multi-GPU placement (``device_map`` across two accelerators) -- needs two devices; the CUDA tests below run
  when one is present.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline, Flux2Transformer2DModel, FluxPipeline, FluxTransformer2DModel
from diffusers.quantizers import PipelineQuantizationConfig
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from tiny_models import get_fixture, run_pipeline
from torch import nn
from upstream_helpers import (
    LoRALayer,
    assert_close_to_twin,
    dense_twin,
    expect_warning,
    is_sdnq_quantized,
    linear_names,
    needs_cuda,
    one_thread,  # noqa: F401  (an autouse fixture: one torch thread)
    relative_error,
    sdnq_layer_names,
    stored_bytes,
)

import diffusers_sdnq
from diffusers_sdnq.integrations.diffusers import SDNQDiffusersConfig, SDNQDiffusersQuantizer
from diffusers_sdnq.integrations.transformers import SDNQTransformersConfig
from diffusers_sdnq.layers import SDNQLayerMixin

TORCH_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
COMPILE_BACKEND = "inductor" if torch.cuda.is_available() else "aot_eager"


# ====================================================================================================== config mixin
class SDNQConfigMixin:
    """SDNQ configs and model creation (the counterpart of upstream's ``BitsAndBytesConfigMixin`` & co).

    Expected class attributes: ``model_class``, ``fixture_name`` (a ``tiny_models`` pipeline whose dense
    ``transformer`` is loaded) and ``get_dummy_inputs()``.
    """

    SDNQ_CONFIGS = {
        "int8": {"weights_dtype": "int8"},
        "uint4": {"weights_dtype": "uint4"},
        "uint4_svd": {"weights_dtype": "uint4", "use_svd": True, "svd_rank": 8},
        "float8_e4m3fn": {"weights_dtype": "float8_e4m3fn"},
    }
    # Upper bounds on the bits one quantized weight costs, companions included: 8-bit codes + a float32 scale per
    # row or group (>= 32 wide: <= 1 bit) -> 10; 4-bit codes + float32 scale and zero point per group of >= 32
    # -> 7; plus rank-8 SVD factors (8 * (in + out) float32 values per layer, <= 4 bits per weight at the tiny
    # widths) -> 12. With a fraction f of the dense float32 weights quantized, the footprint ratio is at least
    # 1 / ((1 - f) + f * bits / 32) (see _test_quantization_memory_footprint).
    SDNQ_BITS_UPPER_BOUND = {"int8": 10, "uint4": 7, "uint4_svd": 12, "float8_e4m3fn": 10}
    # Relative L2 error of the whole model's output against the dense original. Measured on the tiny FLUX.1 /
    # FLUX.2 transformers (random weights with sparse 8x outliers): int8 0.027 / 0.012, float8 0.033 / 0.023,
    # uint4 0.16 / 0.11, uint4+SVD 0.21 / 0.12 (a rank-8 SVD does not help random matrices). Bounds are ~2x
    # that; a decoder that misreads the codes gives errors of order 1.
    SDNQ_OUTPUT_ERROR_BOUND = {"int8": 0.06, "uint4": 0.4, "uint4_svd": 0.4, "float8_e4m3fn": 0.08}

    model_class: type = None
    fixture_name: str = ""
    pretrained_model_name_or_path: str = ""
    pretrained_model_kwargs = {"subfolder": "transformer"}
    modules_to_not_convert_for_test = ["ff_context"]

    def _config(self, config_kwargs: dict) -> SDNQDiffusersConfig:
        return SDNQDiffusersConfig(**{"minimum_allowed_numel": 0, **config_kwargs})

    def _create_quantized_model(self, config_kwargs: dict, **extra_kwargs):
        kwargs = dict(self.pretrained_model_kwargs)
        kwargs["quantization_config"] = self._config(config_kwargs)
        kwargs.update(extra_kwargs)
        return self.model_class.from_pretrained(self.pretrained_model_name_or_path, **kwargs).eval()

    def _verify_if_layer_quantized(self, name: str, module: nn.Module, config_kwargs: dict) -> None:
        assert is_sdnq_quantized(module), f"Layer {name} is {type(module).__name__}, not a packed SDNQ layer"

    def _is_module_quantized(self, module: nn.Module) -> bool:
        return is_sdnq_quantized(module)

    def _load_unquantized_model(self, **extra_kwargs):
        kwargs = {**self.pretrained_model_kwargs, **extra_kwargs}
        return self.model_class.from_pretrained(self.pretrained_model_name_or_path, **kwargs).eval()

    def _forward(self, model, dtype: torch.dtype | None = None, device=None, **kwargs) -> torch.Tensor:
        """The model's output on the dummy inputs, placed on ``device`` (default: where the parameters are)."""
        inputs = self.get_dummy_inputs()
        if dtype is not None:
            inputs = {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                      for k, v in inputs.items()}
        if device is None:
            device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        with torch.no_grad():
            return model(**inputs, **kwargs, return_dict=False)[0]


# ====================================================================================================== generic checks
class QuantizationTesterMixin:
    """The generic checks of upstream's ``QuantizationTesterMixin``, with independent oracles."""

    def _test_quantization_num_parameters(self, config_kwargs):
        model = self._load_unquantized_model()
        model_quantized = self._create_quantized_model(config_kwargs)
        assert model_quantized.num_parameters() == model.num_parameters(), (
            f"Parameter count mismatch: unquantized={model.num_parameters()}, "
            f"quantized={model_quantized.num_parameters()}")
        assert (model_quantized.num_parameters(only_trainable=False, exclude_embeddings=True)
                == model.num_parameters(only_trainable=False, exclude_embeddings=True))

    def _test_quantization_memory_footprint(self, config_kwargs, expected_memory_reduction=1.2):
        model = self._load_unquantized_model()
        model_quantized = self._create_quantized_model(config_kwargs)
        mem, mem_quantized = model.get_memory_footprint(), model_quantized.get_memory_footprint()
        ratio = mem / mem_quantized
        assert ratio >= expected_memory_reduction, (
            f"Memory ratio {ratio:.2f} is less than expected ({expected_memory_reduction}x). "
            f"unquantized={mem}, quantized={mem_quantized}")
        # the footprint is what the tensors hold: dense tensors plus the stored SDNQ tensors, byte for byte
        held = sum(t.numel() * t.element_size() for t in (*model_quantized.parameters(), *model_quantized.buffers()))
        assert mem_quantized == held

    def _expected_memory_reduction(self, config_name: str) -> float:
        """The ratio floor from bits per weight (SDNQ_BITS_UPPER_BOUND) and the share of weights quantized."""
        dense = self._load_unquantized_model()
        quantized = sdnq_layer_names(self._create_quantized_model(self.SDNQ_CONFIGS[config_name]))
        total = sum(p.numel() for p in dense.parameters())
        share = sum(dense.get_submodule(n).weight.numel() for n in quantized) / total
        assert share > 0.5, f"only {share:.0%} of the weights are quantized"
        return 1 / ((1 - share) + share * self.SDNQ_BITS_UPPER_BOUND[config_name] / 32)

    def _test_quantization_inference(self, config_name):
        config_kwargs = self.SDNQ_CONFIGS[config_name]
        model_quantized = self._create_quantized_model(config_kwargs)
        model_quantized.to(TORCH_DEVICE)
        output = self._forward(model_quantized)
        assert torch.isfinite(output).all(), "Model output contains NaN/Inf"
        assert_close_to_twin(output, self._forward(dense_twin(model_quantized)))
        dense = self._forward(self._load_unquantized_model().to(TORCH_DEVICE))
        err = relative_error(output, dense)
        assert 0 < err <= self.SDNQ_OUTPUT_ERROR_BOUND[config_name], f"{config_name}: relative error {err:.4f}"

    def _test_quantization_dtype_assignment(self, config_kwargs):
        model = self._create_quantized_model(config_kwargs)
        before = stored_bytes(model)
        with pytest.raises(ValueError):
            model.to(torch.float16)
        with pytest.raises(ValueError):
            model.to(device=f"{TORCH_DEVICE}:0" if TORCH_DEVICE != "cpu" else "cpu", dtype=torch.float16)
        with pytest.raises(ValueError):
            model.float()
        with pytest.raises(ValueError):
            model.half()
        model.to(TORCH_DEVICE)
        assert stored_bytes(model) == before

    def _test_quantization_lora_inference(self, config_kwargs):
        model = self._create_quantized_model(config_kwargs)
        twin = dense_twin(model)
        base_output = self._forward(model)
        lora_config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                 init_lora_weights=False)
        model.add_adapter(copy.deepcopy(lora_config))
        twin.add_adapter(copy.deepcopy(lora_config))
        set_peft_model_state_dict(twin, get_peft_model_state_dict(model))
        model.to(TORCH_DEVICE)
        twin.to(TORCH_DEVICE)
        output = self._forward(model)
        assert_close_to_twin(output, self._forward(twin))
        assert relative_error(output, base_output) > 1e-3, "the adapter had no effect"

    def _test_quantization_serialization(self, config_kwargs, tmp_path):
        model = self._create_quantized_model(config_kwargs)
        output = self._forward(model)
        model.save_pretrained(str(tmp_path), safe_serialization=True)
        model_loaded = self.model_class.from_pretrained(str(tmp_path)).eval()  # no quantization_config given
        assert sdnq_layer_names(model_loaded) == sdnq_layer_names(model)
        assert stored_bytes(model_loaded) == stored_bytes(model)
        assert torch.equal(self._forward(model_loaded), output)

    def _test_quantized_layers(self, config_kwargs):
        # SDNQ's size rules, stated independently: with add_skip_keys=False and minimum_allowed_numel=0 every
        # Linear whose reduction axis is at least minimum_allowed_channel_size (32) wide is quantized, except the
        # model's _keep_in_fp32_modules.
        model_fp = self._load_unquantized_model()
        keep = self.model_class._keep_in_fp32_modules or []
        expected = {n for n, m in model_fp.named_modules() if isinstance(m, nn.Linear) and m.in_features >= 32
                    and not any(k in n for k in keep)}
        model_quantized = self._create_quantized_model({**config_kwargs, "add_skip_keys": False})
        for name in expected:
            self._verify_if_layer_quantized(name, model_quantized.get_submodule(name), config_kwargs)
        assert expected and sdnq_layer_names(model_quantized) == expected

    def _test_quantization_modules_to_not_convert(self, config_kwargs, modules_to_not_convert):
        model_with_exclusion = self._create_quantized_model({**config_kwargs,
                                                             "modules_to_not_convert": modules_to_not_convert})
        found_excluded = False
        for name, module in model_with_exclusion.named_modules():
            if isinstance(module, nn.Linear) and any(excluded in name for excluded in modules_to_not_convert):
                found_excluded = True
                assert not self._is_module_quantized(module), f"Module {name} should not be quantized"
        assert found_excluded, f"No linear layers found in excluded modules: {modules_to_not_convert}"
        assert any(self._is_module_quantized(m) for n, m in model_with_exclusion.named_modules()
                   if not any(excluded in n for excluded in modules_to_not_convert))
        model_fully_quantized = self._create_quantized_model(config_kwargs)
        assert model_with_exclusion.get_memory_footprint() > model_fully_quantized.get_memory_footprint()

    def _test_quantization_device_map(self, config_kwargs):
        model = self._create_quantized_model(config_kwargs, device_map="auto")
        assert getattr(model, "hf_device_map", None) is not None, "Model should have hf_device_map attribute"
        reference = self._create_quantized_model(config_kwargs)
        assert stored_bytes(model) == stored_bytes(reference)
        assert torch.equal(self._forward(model).cpu(), self._forward(reference))

    def _test_dequantize(self, config_kwargs, dtype: torch.dtype = torch.float32):
        model = self._create_quantized_model(config_kwargs, torch_dtype=dtype)
        model.to(TORCH_DEVICE)
        quantized_output = self._forward(model, dtype)
        model.dequantize()
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear):
                assert not self._is_module_quantized(module), f"Module {name} is still quantized after dequantize()"
                assert type(module) is nn.Linear, f"{name} is {type(module).__name__}, not the plain torch layer"
                assert module.weight.dtype == dtype, f"{name}: {module.weight.dtype}"  # gguf test_dequantize_model
        tol = 1e-4 if dtype == torch.float32 else 1e-2
        assert_close_to_twin(self._forward(model, dtype), quantized_output, atol=tol, rtol=tol)

    def _test_quantization_training(self, config_kwargs, cast_every_1d: bool = True,
                                    load_dtype: torch.dtype | None = None, autocast_dtype=torch.float16):
        """Upstream recipe: freeze, cast 1-D parameters (layer norms) to float32, wrap attention projections with
        adapters, backward under float16 autocast. ``cast_every_1d=False`` casts only floating-point 1-D parameters:
        SDNQ stores sub-byte codes as 1-D uint8 tensors (as the reference does), which the literal recipe would turn
        into float values (the reference then fails too; ours refuses with SDNQShapeError)."""
        model = self._create_quantized_model(config_kwargs, **({"torch_dtype": load_dtype} if load_dtype else {}))
        before = stored_bytes(model)
        for param in model.parameters():
            param.requires_grad = False
            if param.ndim == 1 and (cast_every_1d or param.is_floating_point()):
                param.data = param.data.to(torch.float32)
        adapter_count = 0
        for _, module in model.named_modules():
            if "Attention" in repr(type(module)):
                for attr in ("to_k", "to_q", "to_v"):
                    if hasattr(module, attr):
                        setattr(module, attr, LoRALayer(getattr(module, attr), rank=4))
                        adapter_count += 1
        assert adapter_count > 0
        inputs = {k: v.to(TORCH_DEVICE) for k, v in self.get_dummy_inputs().items()}
        model.to(TORCH_DEVICE)
        with torch.amp.autocast(TORCH_DEVICE, dtype=autocast_dtype):
            out = model(**inputs, return_dict=False)[0]
            out.norm().backward()
        loras = [m for m in model.modules() if isinstance(m, LoRALayer)]
        assert len(loras) == adapter_count
        for module in loras:
            assert module.adapter[1].weight.grad is not None, "LoRA adapter gradient is None"
            assert module.adapter[1].weight.grad.norm().item() > 0, "LoRA adapter gradient norm is zero"
        for module in model.modules():
            if isinstance(module, SDNQLayerMixin):
                assert all(t.grad is None and not t.requires_grad for t in module.sdnq_tensors().values())
        assert sorted(stored_bytes(model).values()) == sorted(before.values())  # names gained ".module"


# ====================================================================================================== SDNQ mixins
class SDNQTesterMixin(SDNQConfigMixin, QuantizationTesterMixin):
    """The SDNQ tester mixin: every generic check, per config, plus the backend's own tests."""

    # ---------------------------------------------------------------- QuantizationTesterMixin, parametrized
    @pytest.mark.parametrize("config_name", list(SDNQConfigMixin.SDNQ_CONFIGS))
    def test_sdnq_quantization_num_parameters(self, config_name):
        self._test_quantization_num_parameters(self.SDNQ_CONFIGS[config_name])

    @pytest.mark.parametrize("config_name", list(SDNQConfigMixin.SDNQ_CONFIGS))
    def test_sdnq_quantization_memory_footprint(self, config_name):
        self._test_quantization_memory_footprint(self.SDNQ_CONFIGS[config_name],
                                                 self._expected_memory_reduction(config_name))

    @pytest.mark.parametrize("config_name", list(SDNQConfigMixin.SDNQ_CONFIGS))
    def test_sdnq_quantization_inference(self, config_name):
        self._test_quantization_inference(config_name)

    def test_sdnq_quantization_dtype_assignment(self):
        self._test_quantization_dtype_assignment(self.SDNQ_CONFIGS["uint4"])

    def test_sdnq_quantization_lora_inference(self):
        self._test_quantization_lora_inference(self.SDNQ_CONFIGS["uint4"])

    @pytest.mark.parametrize("config_name", ["int8", "uint4_svd"])
    def test_sdnq_quantization_serialization(self, config_name, tmp_path):
        self._test_quantization_serialization(self.SDNQ_CONFIGS[config_name], tmp_path)

    def test_sdnq_sharded_checkpoints(self, tmp_path):
        """torchao / bnb run every test on ``tiny-flux-sharded`` too: quantize while loading a sharded dense
        checkpoint, save sharded, reload from the shard index."""
        dense = self._load_unquantized_model()
        dense.save_pretrained(str(tmp_path / "dense"), max_shard_size="300KB")
        assert len(list((tmp_path / "dense").glob("*.safetensors"))) > 1
        model = self.model_class.from_pretrained(str(tmp_path / "dense"),
                                                 quantization_config=self._config(self.SDNQ_CONFIGS["uint4"])).eval()
        reference = self._create_quantized_model(self.SDNQ_CONFIGS["uint4"])
        assert stored_bytes(model) == stored_bytes(reference)
        model.save_pretrained(str(tmp_path / "quantized"), max_shard_size="100KB")
        assert len(list((tmp_path / "quantized").glob("*.safetensors"))) > 1
        loaded = self.model_class.from_pretrained(str(tmp_path / "quantized")).eval()
        assert stored_bytes(loaded) == stored_bytes(model)
        assert torch.equal(self._forward(loaded), self._forward(reference))

    @pytest.mark.parametrize("config_name", list(SDNQConfigMixin.SDNQ_CONFIGS))
    def test_sdnq_quantized_layers(self, config_name):
        self._test_quantized_layers(self.SDNQ_CONFIGS[config_name])

    def test_sdnq_modules_to_not_convert(self):
        self._test_quantization_modules_to_not_convert(self.SDNQ_CONFIGS["int8"], self.modules_to_not_convert_for_test)

    @pytest.mark.parametrize("config_name", ["int8", "uint4"])
    def test_sdnq_device_map(self, config_name):
        self._test_quantization_device_map(self.SDNQ_CONFIGS[config_name])

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_sdnq_dequantize(self, dtype):
        self._test_dequantize(self.SDNQ_CONFIGS["uint4_svd"], dtype)

    def test_sdnq_training(self):
        self._test_quantization_training(self.SDNQ_CONFIGS["int8"])  # 2-D codes: the literal upstream recipe

    def test_sdnq_training_packed_codes(self):
        self._test_quantization_training(self.SDNQ_CONFIGS["uint4"], cast_every_1d=False, load_dtype=torch.bfloat16,
                                         autocast_dtype=torch.bfloat16)

    def test_cpu_device_map(self):
        model = self._create_quantized_model(self.SDNQ_CONFIGS["int8"], device_map="cpu")
        assert getattr(model, "hf_device_map", None) is not None, "hf_device_map should not be None"
        assert model.device == torch.device("cpu")
        assert all(t.device.type == "cpu" for t in model.parameters())

    # ---------------------------------------------------------------- BitsAndBytesTesterMixin & co specifics
    @pytest.mark.parametrize("config_name", ["int8", "uint4_svd"])
    def test_sdnq_quantization_config_serialization(self, config_name):
        model = self._create_quantized_model(self.SDNQ_CONFIGS[config_name])
        assert "quantization_config" in model.config, "Missing quantization_config"
        config = model.config["quantization_config"]
        as_dict = config.to_dict()
        assert config.to_diff_dict() is not None
        assert json.loads(config.to_json_string()) == json.loads(json.dumps(as_dict))
        assert as_dict["quant_method"] == "sdnq"
        for key, value in self.SDNQ_CONFIGS[config_name].items():
            assert as_dict[key] == value
        again = SDNQDiffusersConfig.from_dict(json.loads(config.to_json_string()))
        assert again.to_dict() == as_dict

    def test_sdnq_original_dtype(self, tmp_path):
        model = self._create_quantized_model(self.SDNQ_CONFIGS["int8"], torch_dtype=torch.bfloat16)
        assert model.config["_pre_quantization_dtype"] == torch.bfloat16
        model.save_pretrained(str(tmp_path))
        saved = self.model_class.load_config(str(tmp_path))
        assert "quantization_config" in saved and "_pre_quantization_dtype" not in saved

    def test_sdnq_keep_modules_in_fp32(self, monkeypatch):
        monkeypatch.setattr(self.model_class, "_keep_in_fp32_modules", ["ff_context"])
        model = self._create_quantized_model(self.SDNQ_CONFIGS["uint4"], torch_dtype=torch.bfloat16)
        kept = 0
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and "ff_context" in name:
                kept += 1
                assert not isinstance(module, SDNQLayerMixin), f"{name} was quantized"
                assert module.weight.dtype == torch.float32, f"Module {name} should be FP32"
        assert kept
        assert any(is_sdnq_quantized(m) for m in model.modules())
        dense = self._load_unquantized_model(torch_dtype=torch.bfloat16)
        with torch.amp.autocast("cpu", dtype=torch.bfloat16):
            out, ref = self._forward(model), self._forward(dense)
        assert torch.isfinite(out).all() and relative_error(out, ref) < 0.4

    def test_sdnq_device_assignment(self):
        model = self._create_quantized_model(self.SDNQ_CONFIGS["uint4"])
        mem_before, before = model.get_memory_footprint(), stored_bytes(model)
        model.to("cpu")
        assert model.device.type == "cpu"
        assert model.get_memory_footprint() == mem_before and stored_bytes(model) == before

    @needs_cuda
    def test_sdnq_device_assignment_cuda(self):
        model = self._create_quantized_model(self.SDNQ_CONFIGS["uint4"])
        mem_before, before, out = model.get_memory_footprint(), stored_bytes(model), self._forward(model)
        for device in (0, "cuda", "cuda:0"):
            model.to(device)
            assert model.device == torch.device(0) and model.get_memory_footprint() == mem_before
            assert_close_to_twin(self._forward(model).cpu(), out, atol=1e-3, rtol=1e-3)
            model.to("cpu")
        assert stored_bytes(model) == before

    def test_sdnq_errors_loading_incorrect_state_dict(self, tmp_path):
        model = self._create_quantized_model(self.SDNQ_CONFIGS["int8"])
        model.save_pretrained(str(tmp_path))
        file = tmp_path / "diffusion_pytorch_model.safetensors"
        state_dict = load_file(str(file))
        key = next(k for k in sorted(state_dict) if k.endswith(".scale"))
        state_dict[key] = torch.randn(state_dict[key].shape[0] - 1, 1)
        save_file(state_dict, str(file))
        with pytest.raises(ValueError) as err:
            self.model_class.from_pretrained(str(tmp_path))
        assert key in str(err.value)

    def test_sdnq_wrong_config(self):
        with pytest.raises(ValueError):
            self._create_quantized_model({"weights_dtype": "int42"})

    # ---------------------------------------------------------------- issue 15 items (other branches)
    def test_sdnq_unknown_keyword_raises(self):
        with pytest.raises((TypeError, ValueError), match="weight_dtype"):
            SDNQDiffusersConfig(weight_dtype="uint4")  # misspelt weights_dtype

    def test_sdnq_save_bin_refused(self, tmp_path):
        model = self._create_quantized_model(self.SDNQ_CONFIGS["int8"])
        with pytest.raises(ValueError):
            model.save_pretrained(str(tmp_path), safe_serialization=False)
        assert not list(tmp_path.glob("*.bin"))

    def test_sdnq_warns_when_nothing_is_quantized(self):
        with expect_warning(r"(?i)quantiz"):
            model = self._create_quantized_model({"weights_dtype": "int8", "minimum_allowed_numel": 10**9})
        assert not sdnq_layer_names(model)

    @pytest.mark.parametrize("pattern", ["transformer_blocks.0", "transformer_blocks.0.attn.to_q"])
    def test_sdnq_modules_to_not_convert_module_names(self, pattern):
        # torchao's test_modules_to_not_convert (``["transformer_blocks.0"]``) and transformers' full-name convention
        model = self._create_quantized_model({**self.SDNQ_CONFIGS["int8"], "modules_to_not_convert": [pattern]})
        excluded = {n for n in linear_names(model) if n == pattern or n.startswith(pattern + ".")}
        assert excluded and not excluded & sdnq_layer_names(model)
        assert sdnq_layer_names(model)

    def test_sdnq_unmatched_pattern_warns(self):
        with expect_warning("no_such_layer"):
            self._create_quantized_model({**self.SDNQ_CONFIGS["int8"], "modules_to_not_convert": ["no_such_layer"]})

    def test_sdnq_cpu_disk_offload_quantize_on_load(self, tmp_path):
        # torchao's test_device_map: offloaded layers may stay dense there, so the oracle is the dense original
        # within the type's quantization error, whichever way the backend handles offloaded layers.
        model = self._create_quantized_model(self.SDNQ_CONFIGS["int8"], device_map=self.offload_device_map,
                                             offload_folder=str(tmp_path))
        assert set(model.hf_device_map.values()) == set(self.offload_device_map.values())
        output = self._forward(model)
        dense = self._forward(self._load_unquantized_model())
        assert torch.isfinite(output).all()
        assert relative_error(output, dense) <= self.SDNQ_OUTPUT_ERROR_BOUND["int8"]

    def test_sdnq_cpu_disk_offload_prequantized(self, fixtures_root, tmp_path):
        """torchao ``test_device_map`` with a custom map, on a checkpoint the reference ``sdnq`` wrote: offloaded to
        cpu and disk, it computes what the same checkpoint loaded in memory computes."""
        ckpt = get_fixture(self.fixture_name, "uint4_svd", fixtures_root)
        reference = self.model_class.from_pretrained(str(ckpt), subfolder="transformer").eval()
        model = self.model_class.from_pretrained(str(ckpt), subfolder="transformer",
                                                 device_map=self.offload_device_map,
                                                 offload_folder=str(tmp_path)).eval()
        assert set(model.hf_device_map.values()) == set(self.offload_device_map.values())
        assert torch.equal(self._forward(model), self._forward(reference))

    # ---------------------------------------------------------------- inference mode, offloading
    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    def test_sdnq_inference_mode(self, dtype):
        """A first forward under ``torch.inference_mode()`` must not poison later ones (issue 15 item 1). Run in a
        fresh thread: per-thread buffers are then first made inside inference mode."""
        model = self._create_quantized_model(self.SDNQ_CONFIGS["uint4"], torch_dtype=dtype)
        inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in self.get_dummy_inputs().items()}
        expected = self._forward(dense_twin(model), dtype)
        results: list = []

        def run():
            try:
                with torch.inference_mode():
                    results.append(model(**inputs, return_dict=False)[0].clone())
                with torch.no_grad():
                    results.append(model(**inputs, return_dict=False)[0])
                results.append(model(**inputs, return_dict=False)[0].detach())
            except Exception as exc:  # re-raised in the test's thread
                results.append(exc)

        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
        assert not isinstance(results[-1], Exception), results[-1]
        first, second, third = results
        assert torch.equal(first, second) and torch.equal(second, third)
        assert_close_to_twin(first, expected, atol=1e-2, rtol=1e-2)

    def test_sdnq_group_offload(self):
        model = self._create_quantized_model(self.SDNQ_CONFIGS["uint4"])
        expected = self._forward(model)
        model.enable_group_offload(onload_device=torch.device(TORCH_DEVICE), offload_device=torch.device("cpu"),
                                   offload_type="leaf_level")
        output = self._forward(model, device=TORCH_DEVICE).cpu()
        if TORCH_DEVICE == "cpu":
            assert torch.equal(output, expected)
        else:
            assert_close_to_twin(output, expected, atol=1e-3, rtol=1e-3)


class SDNQCompileTesterMixin(SDNQConfigMixin):
    """``QuantizationCompileTesterMixin`` for SDNQ."""

    @pytest.fixture(autouse=True)
    def _reset_compiler(self):
        torch.compiler.reset()
        yield
        torch.compiler.reset()

    def _test_torch_compile(self, config_kwargs):
        model = self._create_quantized_model(config_kwargs)
        model.to(TORCH_DEVICE).eval()
        expected = self._forward(model)
        compiled = torch.compile(model, fullgraph=True, backend=COMPILE_BACKEND)
        with torch._dynamo.config.patch(error_on_recompile=True):
            output = self._forward(compiled)
            again = self._forward(compiled)
        assert torch.isfinite(output).all()
        assert_close_to_twin(output, expected, atol=1e-5, rtol=1e-5)
        assert torch.equal(output, again)

    def _test_torch_compile_with_group_offload(self, config_kwargs, use_stream=False):
        model = self._create_quantized_model(config_kwargs).eval()
        expected = self._forward(model)
        model.enable_group_offload(onload_device=torch.device(TORCH_DEVICE), offload_device=torch.device("cpu"),
                                   offload_type="leaf_level", use_stream=use_stream)
        compiled = torch.compile(model, backend=COMPILE_BACKEND)
        with torch._dynamo.config.patch(cache_size_limit=1000):
            output = self._forward(compiled, device=TORCH_DEVICE).cpu()
        assert_close_to_twin(output, expected, atol=1e-3, rtol=1e-3)

    @pytest.mark.parametrize("config_name", ["uint4"])
    def test_sdnq_torch_compile(self, config_name):
        self._test_torch_compile(self.SDNQ_CONFIGS[config_name])

    @needs_cuda  # on CPU the onload and offload devices coincide; test_sdnq_group_offload covers CPU offloading
    @pytest.mark.parametrize("config_name", ["uint4_svd"])
    def test_sdnq_torch_compile_with_group_offload(self, config_name):
        self._test_torch_compile_with_group_offload(self.SDNQ_CONFIGS[config_name])

    @needs_cuda
    def test_sdnq_torch_compile_with_group_offload_stream(self):
        self._test_torch_compile_with_group_offload(self.SDNQ_CONFIGS["uint4"], use_stream=True)


# ====================================================================================================== model classes
@pytest.fixture(scope="class")
def _dense_transformer(request, fixtures_root: Path):
    request.cls.pretrained_model_name_or_path = str(get_fixture(request.cls.fixture_name, "dense", fixtures_root))


def _arange_ids(n: int, axes: int) -> torch.Tensor:
    return torch.stack([torch.arange(n) % (k + 2) for k in range(axes)], dim=-1).float()


@pytest.mark.usefixtures("_dense_transformer")
class TestFluxTransformerSDNQ(SDNQTesterMixin, SDNQCompileTesterMixin):
    model_class = FluxTransformer2DModel
    fixture_name = "flux1"
    offload_device_map = {"time_text_embed": "cpu", "context_embedder": "cpu", "x_embedder": "cpu",
                          "transformer_blocks.0": "cpu", "single_transformer_blocks.0": "disk",
                          "norm_out": "cpu", "proj_out": "cpu", "pos_embed": "cpu"}

    def get_dummy_inputs(self):
        gen = torch.Generator("cpu").manual_seed(0)
        return {
            "hidden_states": torch.randn((1, 16, 16), generator=gen),
            "encoder_hidden_states": torch.randn((1, 8, 64), generator=gen),
            "pooled_projections": torch.randn((1, 64), generator=gen),
            "timestep": torch.tensor([0.5]),
            "img_ids": _arange_ids(16, 3),
            "txt_ids": _arange_ids(8, 3),
            "guidance": torch.tensor([3.5]),
        }


@pytest.mark.usefixtures("_dense_transformer")
class TestFlux2TransformerSDNQ(SDNQTesterMixin):
    model_class = Flux2Transformer2DModel
    fixture_name = "flux2_klein"
    modules_to_not_convert_for_test = ["ff_context"]
    offload_device_map = {"time_guidance_embed": "cpu", "double_stream_modulation_img": "cpu",
                          "double_stream_modulation_txt": "cpu", "single_stream_modulation": "cpu",
                          "x_embedder": "cpu", "context_embedder": "cpu", "transformer_blocks.0": "cpu",
                          "single_transformer_blocks.0": "disk", "norm_out": "cpu", "proj_out": "cpu",
                          "pos_embed": "cpu"}

    def get_dummy_inputs(self):
        gen = torch.Generator("cpu").manual_seed(0)
        return {
            "hidden_states": torch.randn((1, 16, 16), generator=gen),
            "encoder_hidden_states": torch.randn((1, 8, 192), generator=gen),
            "timestep": torch.tensor([0.5]),
            "img_ids": _arange_ids(16, 4),
            "txt_ids": _arange_ids(8, 4),
        }


# ====================================================================================================== TorchAoConfigTest
def test_sdnq_config_to_dict():
    """torchao ``test_to_dict``: every key of ``to_dict()`` is an attribute with the same value."""
    config = SDNQDiffusersConfig(weights_dtype="uint4", group_size=32, modules_to_not_convert=["proj_out"])
    as_dict = config.to_dict()
    for key in as_dict:
        if key != "quant_method":
            assert getattr(config, key) == as_dict[key], key
    assert as_dict["quant_method"] == "sdnq" and as_dict["modules_to_not_convert"] == ["proj_out"]


def test_sdnq_config_post_init_check():
    """torchao ``test_post_init_check``: an unsupported type is refused, with a ValueError naming it."""
    SDNQDiffusersConfig(weights_dtype="uint4")
    with pytest.raises(ValueError, match="uint99"):
        SDNQDiffusersConfig(weights_dtype="uint99")


def test_sdnq_config_repr():
    """torchao ``test_repr``: the repr is the class name and the JSON of ``to_dict()``."""
    config = SDNQDiffusersConfig(weights_dtype="int8", modules_to_not_convert=["conv"])
    text = repr(config)
    assert text.startswith("SDNQDiffusersConfig")
    assert json.loads(text[text.index("{"):]) == json.loads(json.dumps(config.to_dict()))


def test_sdnq_drop_in_config_for_both_libraries(fixtures_root: Path):
    """test_sdnq.py uses one ``SDNQConfig`` for diffusers and transformers; ``diffusers_sdnq.SDNQConfig`` must too."""
    from transformers import AutoModelForCausalLM

    from diffusers_sdnq import SDNQConfig  # noqa: I001 - the drop-in name the reference users know

    root = get_fixture("flux1", "dense", fixtures_root)
    transformer = FluxTransformer2DModel.from_pretrained(str(root), subfolder="transformer",
                                                         quantization_config=SDNQConfig(weights_dtype="int8"))
    lm = AutoModelForCausalLM.from_pretrained(str(get_fixture("qwen3", "dense", fixtures_root)),
                                              quantization_config=SDNQConfig(weights_dtype="int8",
                                                                             minimum_allowed_numel=0))
    assert sdnq_layer_names(transformer) and sdnq_layer_names(lm)


_DIFFUSERS_SDNQCONFIG_CHILD = r"""
import sys, torch
from diffusers import FluxTransformer2DModel, SDNQConfig   # diffusers' own entry point (imports the reference)
import diffusers_sdnq
from diffusers_sdnq.layers import SDNQLinear
model = FluxTransformer2DModel.from_pretrained(sys.argv[1], subfolder="transformer",
                                               quantization_config=SDNQConfig(weights_dtype="int8"))
layers = [n for n, m in model.named_modules() if isinstance(m, SDNQLinear)]
assert layers, "no diffusers-sdnq layer"
print("OK", len(layers))
"""


def test_diffusers_sdnq_config_entry_point(fixtures_root: Path):
    """``diffusers.SDNQConfig`` (diffusers' documented entry point) works with our quantizer (child process:
    that entry point imports the reference package, which the test process never does)."""
    root = get_fixture("flux1", "dense", fixtures_root)
    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", _DIFFUSERS_SDNQCONFIG_CHILD, str(root)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


# ====================================================================================================== pipelines
@pytest.fixture(scope="module")
def flux1_dense(fixtures_root: Path) -> Path:
    return get_fixture("flux1", "dense", fixtures_root)


def _pipeline_twin(pipe):
    twin = copy.deepcopy(pipe)
    for component in twin.components.values():
        if isinstance(component, nn.Module):
            diffusers_sdnq.dequantize_model(component)
    return twin


SMALL = {"minimum_allowed_numel": 0}


def test_quant_config_set_correctly_through_kwargs(flux1_dense: Path):
    """test_pipeline_level_quantization: ``quant_backend="sdnq"`` quantizes a diffusers and a transformers component."""
    components = ["transformer", "text_encoder_2"]
    quant_config = PipelineQuantizationConfig(quant_backend="sdnq", quant_kwargs={"weights_dtype": "uint4", **SMALL},
                                              components_to_quantize=components)
    pipe = DiffusionPipeline.from_pretrained(str(flux1_dense), quantization_config=quant_config)
    for name, component in pipe.components.items():
        if not isinstance(component, nn.Module):
            continue
        config = getattr(component.config, "quantization_config", None)
        if name in components:
            qc = config if isinstance(config, dict) else config.to_dict()
            assert qc["quant_method"] == "sdnq" and qc["weights_dtype"] == "uint4"
            assert sdnq_layer_names(component), name
        else:
            assert config is None and not sdnq_layer_names(component)
    out = run_pipeline(pipe)
    assert_close_to_twin(out, run_pipeline(_pipeline_twin(pipe)))


def test_quant_config_set_correctly_granular_and_saving_loading(flux1_dense: Path, tmp_path: Path):
    """``quant_mapping`` with each library's SDNQ config; save the pipeline, reload it without a config."""
    quant_config = PipelineQuantizationConfig(quant_mapping={
        "transformer": SDNQDiffusersConfig(weights_dtype="int8", **SMALL),
        "text_encoder_2": SDNQTransformersConfig(weights_dtype="uint4", use_svd=True, svd_rank=4, **SMALL),
    })
    pipe = DiffusionPipeline.from_pretrained(str(flux1_dense), quantization_config=quant_config)
    assert isinstance(pipe.transformer.hf_quantizer, SDNQDiffusersQuantizer)
    assert sdnq_layer_names(pipe.transformer) and sdnq_layer_names(pipe.text_encoder_2)
    output_1 = run_pipeline(pipe)
    pipe.save_pretrained(str(tmp_path))
    loaded = DiffusionPipeline.from_pretrained(str(tmp_path))
    for name in ("transformer", "text_encoder_2"):
        assert stored_bytes(getattr(loaded, name)) == stored_bytes(getattr(pipe, name)), name
    assert torch.equal(run_pipeline(loaded), output_1)


def test_validation_for_kwargs_accepts_both_libraries():
    """Upstream: quanto's diffusers and transformers configs take different keywords, so ``quant_backend="quanto"``
    across both libraries is refused. SDNQ's two configs take the same keywords, so the same request is accepted
    (``test_quant_config_set_correctly_through_kwargs`` then loads such a pipeline)."""
    config = PipelineQuantizationConfig(quant_backend="sdnq", quant_kwargs={"weights_dtype": "int8"},
                                        components_to_quantize=["transformer", "text_encoder_2"])
    assert config.quant_backend == "sdnq"


def test_generate_quality_dequantize_and_lora(flux1_dense: Path):
    """bnb ``test_generate_quality_dequantize`` and ``test_lora_loading`` (weighted adapter) on a pipeline:
    both compared with the dense twin pipeline instead of recorded slices."""
    transformer = FluxTransformer2DModel.from_pretrained(str(flux1_dense), subfolder="transformer",
                                                         quantization_config=SDNQDiffusersConfig(weights_dtype="uint4",
                                                                                                 **SMALL))
    pipe = FluxPipeline.from_pretrained(str(flux1_dense), transformer=transformer)
    twin = _pipeline_twin(pipe)
    dense = FluxTransformer2DModel.from_pretrained(str(flux1_dense), subfolder="transformer")
    targets = [n for n, m in dense.named_modules() if isinstance(m, nn.Linear) and "attn" in n]
    dense.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False))
    lora = {f"transformer.{k}": v for k, v in get_peft_model_state_dict(dense).items()}
    for p in (pipe, twin):
        p.load_lora_weights(copy.deepcopy(lora), adapter_name="tiny")
        p.set_adapters("tiny", adapter_weights=0.5)
    with_lora = run_pipeline(pipe)
    assert_close_to_twin(with_lora, run_pipeline(twin))
    for p in (pipe, twin):
        p.unload_lora_weights()
    pipe.transformer.dequantize()
    assert not sdnq_layer_names(pipe.transformer)
    dequantized = run_pipeline(pipe)
    assert_close_to_twin(dequantized, run_pipeline(twin))
    assert relative_error(with_lora, dequantized) > 1e-3
    _ = run_pipeline(pipe)  # calling it again is not a problem


def test_prequantized_pipeline_round_trip(fixtures_root: Path, tmp_path: Path):
    """test_sdnq.py ``test_prequantized_pipeline_round_trip``: a transformer and a text encoder quantized while
    loading, saved with the pipeline, reloaded quantized from their config.json files alone."""
    root = get_fixture("flux1", "dense", fixtures_root)
    transformer = FluxTransformer2DModel.from_pretrained(str(root), subfolder="transformer",
                                                         quantization_config=SDNQDiffusersConfig(weights_dtype="int8",
                                                                                                 **SMALL))
    from transformers import CLIPTextModel

    text_encoder = CLIPTextModel.from_pretrained(str(root), subfolder="text_encoder",
                                                 quantization_config=SDNQTransformersConfig(weights_dtype="int8",
                                                                                            **SMALL))
    pipe = FluxPipeline.from_pretrained(str(root), transformer=transformer, text_encoder=text_encoder)
    expected = run_pipeline(pipe)
    pipe.save_pretrained(str(tmp_path))
    del pipe, transformer, text_encoder
    loaded = FluxPipeline.from_pretrained(str(tmp_path))
    assert sdnq_layer_names(loaded.transformer) and sdnq_layer_names(loaded.text_encoder)
    assert torch.equal(run_pipeline(loaded), expected)


def test_pipeline_quantization_memory_ordering(flux1_dense: Path):
    """torchao ``test_memory_footprint``: narrower types and larger groups make smaller models; dense is largest."""
    def size(**kwargs):
        if not kwargs:
            model = FluxTransformer2DModel.from_pretrained(str(flux1_dense), subfolder="transformer")
        else:
            model = FluxTransformer2DModel.from_pretrained(str(flux1_dense), subfolder="transformer",
                                                           quantization_config=SDNQDiffusersConfig(**kwargs, **SMALL))
        return model.get_memory_footprint()

    uint4, uint4_g16, int8, dense = size(weights_dtype="uint4"), size(weights_dtype="uint4", group_size=16), \
        size(weights_dtype="int8"), size()
    assert uint4 < uint4_g16 < int8 < dense


@needs_cuda
def test_model_cpu_offload(flux1_dense: Path):
    """quanto/bnb ``test_model_cpu_offload`` and torchao ``test_sequential_cpu_offload`` (need an accelerator)."""
    for offload in ("enable_model_cpu_offload", "enable_sequential_cpu_offload"):
        transformer = FluxTransformer2DModel.from_pretrained(
            str(flux1_dense), subfolder="transformer", quantization_config=SDNQDiffusersConfig(weights_dtype="int8",
                                                                                               **SMALL))
        pipe = FluxPipeline.from_pretrained(str(flux1_dense), transformer=transformer)
        expected = run_pipeline(_pipeline_twin(pipe))
        getattr(pipe, offload)(device="cuda")
        assert_close_to_twin(run_pipeline(pipe), expected, atol=1e-3, rtol=1e-3)


@needs_cuda
def test_pipeline_device_placement(flux1_dense: Path):
    """bnb ``test_pipeline_device_placement_works_with_nf4``: a pipeline with quantized diffusers and transformers
    components moves to the accelerator with ``.to()`` and runs."""
    quant_config = PipelineQuantizationConfig(quant_backend="sdnq", quant_kwargs={"weights_dtype": "uint4", **SMALL},
                                              components_to_quantize=["transformer", "text_encoder_2"])
    pipe = DiffusionPipeline.from_pretrained(str(flux1_dense), quantization_config=quant_config)
    expected = run_pipeline(_pipeline_twin(pipe))
    pipe.to("cuda")
    assert all(t.device.type == "cuda" for t in pipe.transformer.parameters())
    assert_close_to_twin(run_pipeline(pipe).cpu(), expected, atol=1e-3, rtol=1e-3)


def test_warnings_are_not_raised_for_a_plain_load(flux1_dense: Path):
    """A plain quantize-on-load raises no SDNQ warning (every warning the backend gives has to mean something)."""
    from diffusers_sdnq.format.errors import SDNQWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = FluxTransformer2DModel.from_pretrained(str(flux1_dense), subfolder="transformer",
                                                       quantization_config=SDNQDiffusersConfig(weights_dtype="int8",
                                                                                               **SMALL))
    ours = [str(w.message) for w in caught if issubclass(w.category, SDNQWarning) or "sdnq" in str(w.message).lower()]
    assert not ours
    assert sdnq_layer_names(model)
    with tempfile.TemporaryDirectory() as out:
        model.save_pretrained(out)
        assert (Path(out) / "quantization_config.json").is_file()
