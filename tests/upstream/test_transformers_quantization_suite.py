"""transformers' quantization test suites for weight-only backends, ported to the SDNQ backend (tiny models, CPU).

Ported from huggingface/transformers (Apache-2.0) ``tests/quantization/``, read in the code index (transformers
5.25.0 runs here): ``quanto_integration/test_quanto.py``, ``hqq/test_hqq.py``, ``torchao_integration/
test_torchao.py``, ``finegrained_fp8/test_fp8.py``, ``bnb/test_4bit.py`` and ``bnb/test_mixed_int8.py`` -- the
classes of test that apply to a weight-only backend: config round trips, quantize-on-load and pre-quantized
``from_pretrained``, layer conversion with ``modules_to_not_convert``, generate, save/load, device maps (cpu,
auto, cpu/disk offload), ``compute_module_sizes``, parameter counts and memory footprint, dtype and device moves,
dequantize, ``torch.compile``, training with adapters, pipelines, unknown keywords.

Adaptations. Upstream uses hub checkpoints and compares generated text with strings recorded on GPUs. Here the
models are a tiny Qwen3 (``tests/tiny_models.py``, untied head) and a tiny OPT built from a config (biases,
LayerNorms, tied head), and every output is compared with the dense twin (same weights dequantized, stock
transformers forward: equal greedy tokens, logits to float rounding) and with the dense original within the
quantization error of the type. Configs pass ``minimum_allowed_numel=0`` (the tiny layers are below SDNQ's size
limit). ``torch.compile`` uses the ``aot_eager`` backend on CPU.

Not applicable to SDNQ by design (with the reason):

* quanto ``test_weight_and_activation_quantization_conversion`` / ``QuantoQuantizationActivationTest``, torchao
  ``int8_dynamic_activation_*`` / ``float8dq`` / ``autoquant``, bnb ``llm_int8_threshold`` / outlier handling --
  activation quantization; SDNQ quantizes weights only.
* hqq ``offload_meta`` / HQQ backends, bnb ``Params4bit`` / ``quant_state`` / ``bnb_4bit_use_double_quant`` /
  ``test_rwkv_4bit``, fp8 ``weight_block_size=(128, 128)`` checks and ``FP8Linear`` kernels -- other formats'
  internals; their SDNQ counterparts (stored tensor dtypes and shapes, ``group_size``) are ported.
* bnb ``test_raise_on_save_pretrained`` (old bnb versions), ``test_get_keys_to_not_convert_trust_remote_code`` --
  remote code and bnb version gates.
* 8-bit optimizer states (``bnb.optim``) -- a bitsandbytes optimizer, unrelated to the weight format.
* bnb ``test_device_and_dtype_assignment``'s ``.half()`` / ``.float()`` refusals -- transformers' own check for
  every quantized model; the SDNQ part (``.to(dtype)`` keeps the stored tensors) is
  ``test_quantized_model_to_new_device_and_new_dtype``.
* multi-GPU tests (``*_multi_gpu`` / ``*_multi_accelerator``) -- need two devices. Single-CUDA variants below run
  when CUDA is present.
* torchao ``test_model_memory_usage`` / peak-memory checks -- measured in ``bench/`` (project rule); the stored
  footprint and ``compute_module_sizes`` are checked here.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from tiny_models import PROMPT, get_fixture
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    OPTConfig,
    OPTForCausalLM,
    T5EncoderModel,
    pipeline,
)
from transformers.quantizers import AutoHfQuantizer
from transformers.quantizers.auto import AutoQuantizationConfig
from upstream_helpers import (
    LoRALayer,
    assert_close_to_twin,
    dense_twin,
    expect_warning,
    is_sdnq_quantized,
    needs_cuda,
    one_thread,  # noqa: F401  (an autouse fixture: one torch thread)
    relative_error,
    sdnq_layer_names,
    stored_bytes,
)

from diffusers_sdnq.integrations.transformers import SDNQHfQuantizer, SDNQTransformersConfig
from diffusers_sdnq.layers import SDNQLayerMixin

COMPILE_BACKEND = "inductor" if torch.cuda.is_available() else "aot_eager"
SMALL = {"minimum_allowed_numel": 0}
MAX_NEW_TOKENS = 4


def sdnq_config(**kwargs) -> SDNQTransformersConfig:
    return SDNQTransformersConfig(**{**SMALL, **kwargs})


# ====================================================================================================== config tests
def test_to_dict():
    """fp8/hqq/torchao ``test_to_dict``: every key of ``to_dict()`` reads back as the attribute."""
    config = sdnq_config(weights_dtype="uint4", group_size=32, modules_to_not_convert=["lm_head"])
    as_dict = config.to_dict()
    for key, value in as_dict.items():
        assert getattr(config, key) == value, key
    assert as_dict["quant_method"] == "sdnq"


def test_from_dict():
    """fp8 ``test_from_dict``: a dict becomes the config, through transformers' own dispatcher too."""
    raw = {"modules_to_not_convert": ["lm_head.weight"], "quant_method": "sdnq", "weights_dtype": "int8"}
    config = AutoQuantizationConfig.from_dict(dict(raw))
    assert isinstance(config, SDNQTransformersConfig)
    assert config.modules_to_not_convert == raw["modules_to_not_convert"] and config.quant_method == "sdnq"
    assert json.loads(config.to_json_string()) == config.to_dict()
    assert SDNQTransformersConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()


def test_repr():
    config = sdnq_config(weights_dtype="int8", modules_to_not_convert=["lm_head"])
    text = repr(config)
    assert text.startswith("SDNQTransformersConfig")
    assert json.loads(text[text.index("{"):]) == json.loads(json.dumps(config.to_dict()))


def test_wrong_config():
    """torchao ``test_post_init_check`` / ``test_wrong_config``: an unsupported type is refused, naming it."""
    with pytest.raises(ValueError, match="int42"):
        SDNQTransformersConfig(weights_dtype="int42")


def test_unknown_keyword_raises():
    """torchao ``test_post_init_check``: "does not support the following keyword arguments"."""
    with pytest.raises((TypeError, ValueError), match="weight_dtype"):
        SDNQTransformersConfig(weight_dtype="uint4")


# ====================================================================================================== model mixin
class SDNQTransformersTesterMixin:
    """The per-model tests. Expected: ``dense_path`` (set by a class fixture), ``input_ids``, ``lm_head_skipped``."""

    dense_path: str = ""
    input_ids = torch.tensor([[5, 17, 42, 9, 100, 3, 77, 8]])

    # ------------------------------------------------------------------ helpers
    def load_dense(self, **kwargs):
        return AutoModelForCausalLM.from_pretrained(self.dense_path, **kwargs).eval()

    def load_quantized(self, **config_kwargs):
        extra = config_kwargs.pop("load_kwargs", {})
        config = sdnq_config(**{"weights_dtype": "int8", **config_kwargs})
        return AutoModelForCausalLM.from_pretrained(self.dense_path, quantization_config=config, **extra).eval()

    def logits(self, model) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=self.input_ids.to(model.device)).logits

    def generate(self, model) -> torch.Tensor:
        with torch.no_grad():
            return model.generate(self.input_ids.to(model.device), max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                                  pad_token_id=0).cpu()

    def check_inference_correctness(self, model, twin=None, bound: float = 0.1):
        """Greedy tokens and logits equal the dense twin's; logits within ``bound`` of the dense original's."""
        twin = dense_twin(model) if twin is None else twin
        assert torch.equal(self.generate(model), self.generate(twin))
        logits = self.logits(model)
        assert_close_to_twin(logits, self.logits(twin))
        err = relative_error(logits, self.logits(self.load_dense()))
        assert 0 < err <= bound, f"relative error to the dense model {err:.4f}"

    def expected_quantized(self, dense) -> set[str]:
        """SDNQ's rules stated independently: every Linear whose input is >= 32 wide, except the output head
        (tied or in the default skip list) and what the config leaves out."""
        return {n for n, m in dense.named_modules() if isinstance(m, nn.Linear) and m.in_features >= 32
                and n != "lm_head"}

    # ------------------------------------------------------------------ conversion (quanto / fp8 / bnb)
    def test_weight_only_quantization_conversion(self):
        model = self.load_quantized()
        assert isinstance(model.hf_quantizer, SDNQHfQuantizer)
        expected = self.expected_quantized(self.load_dense())
        assert expected and sdnq_layer_names(model) == expected
        for name in expected:
            assert is_sdnq_quantized(model.get_submodule(name)), name
        assert not isinstance(model.lm_head, SDNQLayerMixin)  # "check that the lm_head was indeed not quantized"

    def test_quantized_model_conversion_on_meta(self):
        """fp8 ``test_quantized_model_conversion`` (``replace_with_fp8_linear`` on an empty model): the quantizer's
        model surgery on the meta device swaps exactly the layers SDNQ quantizes, before any weight exists."""
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(self.dense_path))
            hf_quantizer = AutoHfQuantizer.from_config(sdnq_config(weights_dtype="int8"), pre_quantized=False)
            hf_quantizer.preprocess_model(model=model, config=model.config, dtype=torch.float32)
        assert sdnq_layer_names(model) == self.expected_quantized(self.load_dense())
        assert all(p.device.type == "meta" for p in model.parameters())

    @pytest.mark.parametrize("skip", [["lm_head"], ["q_proj"], ["mlp"]])
    def test_conversion_with_modules_to_not_convert(self, skip):
        model = self.load_quantized(modules_to_not_convert=skip)
        skipped = {n for n in self.expected_quantized(self.load_dense()) if any(s in n.split(".") for s in skip)}
        assert sdnq_layer_names(model) == self.expected_quantized(self.load_dense()) - skipped
        assert sdnq_layer_names(model)

    def test_conversion_with_full_module_names(self):
        """fp8 ``modules_to_not_convert=["fc1"]`` semantics with transformers' full module names."""
        name = sorted(self.expected_quantized(self.load_dense()))[0]
        model = self.load_quantized(modules_to_not_convert=[name])
        assert name not in sdnq_layer_names(model) and sdnq_layer_names(model)

    def test_unmatched_modules_to_not_convert_warns(self):
        with expect_warning("no_such_layer"):
            self.load_quantized(modules_to_not_convert=["no_such_layer"])

    def test_quantizing_nothing_warns(self):
        with expect_warning(r"(?i)quantiz"):
            model = self.load_quantized(minimum_allowed_numel=10**9)
        assert not sdnq_layer_names(model)

    # ------------------------------------------------------------------ inference (quanto / fp8 / hqq)
    @pytest.mark.parametrize("weights_dtype,bound", [("int8", 0.05), ("uint4", 0.4), ("float8_e4m3fn", 0.1)])
    def test_quantized_model(self, weights_dtype, bound):
        # bounds: ~2x the measured relative logit error on these models (weight error of the type: 2^-8 / 2^-4)
        self.check_inference_correctness(self.load_quantized(weights_dtype=weights_dtype), bound=bound)

    def test_quantized_model_svd_and_groups(self):
        model = self.load_quantized(weights_dtype="uint4", use_svd=True, svd_rank=4, group_size=32)
        self.check_inference_correctness(model, bound=0.4)

    def test_hqq_layer(self):
        """hqq ``check_hqqlayer``: a quantized layer's output has the dense shape and the compute dtype, and is
        ``F.linear`` with the dequantized weight."""
        model = self.load_quantized(weights_dtype="uint4", load_kwargs={"dtype": torch.bfloat16})
        name = sorted(sdnq_layer_names(model))[0]
        layer = model.get_submodule(name)
        x = torch.randn(1, 7, layer.in_features, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
        w = layer.dequantize_weight()
        with torch.no_grad():
            out = layer(x)
        assert out.shape[-1] == w.shape[0] and out.dtype == torch.bfloat16
        ref = torch.nn.functional.linear(x.float(), w.float(), None if layer.bias is None else layer.bias.float())
        torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    def test_inference_mode(self, dtype):
        """Generation under ``torch.inference_mode()`` followed by forwards outside it (issue 15 item 1), in a fresh
        thread so the per-thread buffers are first made inside inference mode."""
        model = self.load_quantized(weights_dtype="uint4", load_kwargs={"dtype": dtype})
        expected = self.logits(dense_twin(model))
        results: list = []

        def run():
            try:
                with torch.inference_mode():
                    model.generate(self.input_ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
                    results.append(model(input_ids=self.input_ids).logits.clone())
                with torch.no_grad():
                    results.append(model(input_ids=self.input_ids).logits)
                results.append(model(input_ids=self.input_ids).logits.detach())
            except Exception as exc:  # re-raised in the test's thread
                results.append(exc)

        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
        assert not isinstance(results[-1], Exception), results[-1]
        first, second, third = results
        assert torch.equal(first, second) and torch.equal(second, third)
        assert_close_to_twin(first, expected, atol=2e-2, rtol=2e-2)

    # ------------------------------------------------------------------ serialization (fp8 / torchao / quanto)
    def test_save_pretrained(self, tmp_path):
        model = self.load_quantized(weights_dtype="uint4", group_size=32)
        tokens, logits = self.generate(model), self.logits(model)
        model.save_pretrained(str(tmp_path))
        saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
        assert saved["quant_method"] == "sdnq" and saved["weights_dtype"] == "uint4" and saved["group_size"] == 32
        loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()  # no quantization_config given
        assert isinstance(loaded.hf_quantizer, SDNQHfQuantizer)
        assert stored_bytes(loaded) == stored_bytes(model)
        assert torch.equal(self.generate(loaded), tokens) and torch.equal(self.logits(loaded), logits)

    def test_sharded_checkpoints(self, tmp_path):
        """Quantize while loading a sharded dense checkpoint; save sharded; reload from the shard index."""
        dense = self.load_dense()
        dense.save_pretrained(str(tmp_path / "dense"), max_shard_size="100KB")
        assert len(list((tmp_path / "dense").glob("*.safetensors"))) > 1
        config = sdnq_config(weights_dtype="uint4")
        model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "dense"), quantization_config=config).eval()
        reference = self.load_quantized(weights_dtype="uint4")
        assert stored_bytes(model) == stored_bytes(reference)
        model.save_pretrained(str(tmp_path / "quantized"), max_shard_size="50KB")
        assert len(list((tmp_path / "quantized").glob("*.safetensors"))) > 1
        loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "quantized")).eval()
        assert stored_bytes(loaded) == stored_bytes(model)
        assert torch.equal(self.logits(loaded), self.logits(reference))

    def test_save_pretrained_without_safetensors(self, tmp_path):
        """quanto ``test_serialization_bin``: transformers 5 writes safetensors whatever the flag says; a save is
        either refused with a ValueError or reloads bit-identically (never a file this package cannot load)."""
        model = self.load_quantized(weights_dtype="int8")
        try:
            model.save_pretrained(str(tmp_path), safe_serialization=False)
        except ValueError:
            assert not list(tmp_path.glob("*.bin"))
            return
        loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
        assert stored_bytes(loaded) == stored_bytes(model)

    def test_weight_and_scale_dtypes(self):
        """fp8 ``test_weight_and_weight_scale_inv`` / ``test_block_size``: the stored tensors' dtypes and shapes."""
        int8 = self.load_quantized(weights_dtype="int8", group_size=-1)
        fp8 = self.load_quantized(weights_dtype="float8_e4m3fn", group_size=-1)
        uint4 = self.load_quantized(weights_dtype="uint4", group_size=32)
        dense = self.load_dense()
        for name in sorted(sdnq_layer_names(int8)):
            out_f, in_f = dense.get_submodule(name).weight.shape
            a, b, c = int8.get_submodule(name), fp8.get_submodule(name), uint4.get_submodule(name)
            assert a.weight.dtype == torch.int8 and b.weight.dtype == torch.float8_e4m3fn
            assert c.weight.dtype == torch.uint8 and c.weight.numel() == out_f * in_f // 2  # two codes per byte
            for layer in (a, b):  # one scale per output row
                assert layer.scale.dtype == torch.float32 and layer.scale.numel() == out_f
            assert c.scale.dtype == torch.float32 and c.scale.numel() == out_f * in_f // 32  # one per group of 32
            assert c.zero_point.numel() == c.scale.numel()

    # ------------------------------------------------------------------ sizes and counts (bnb / torchao)
    def test_memory_footprint(self):
        dense, model = self.load_dense(), self.load_quantized(weights_dtype="uint4", group_size=32)
        quantized = sdnq_layer_names(model)
        share = sum(dense.get_submodule(n).weight.numel() for n in quantized) / dense.num_parameters()
        # 4-bit codes + float32 scale and zero point per 32 weights = 6 bits per quantized weight
        floor = 1 / ((1 - share) + share * 6 / 32)
        ratio = dense.get_memory_footprint() / model.get_memory_footprint()
        assert ratio >= floor * 0.999, f"{ratio:.3f} < {floor:.3f}"

    def test_num_parameters(self):
        dense, model = self.load_dense(), self.load_quantized(weights_dtype="uint4")
        assert model.num_parameters() == dense.num_parameters()
        assert model.num_parameters(exclude_embeddings=True) == dense.num_parameters(exclude_embeddings=True)

    def test_compute_module_sizes(self):
        """torchao/fp8 ``test_compute_module_sizes``: device-map planning sizes quantized weights by packed bytes."""
        from transformers.integrations.accelerate import compute_module_sizes

        with torch.device("meta"):
            config = AutoConfig.from_pretrained(self.dense_path)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
            model_size, _ = compute_module_sizes(model, only_modules=False)
            hf_quantizer = AutoHfQuantizer.from_config(sdnq_config(weights_dtype="int8", group_size=-1),
                                                       pre_quantized=False)
            hf_quantizer.preprocess_model(model=model, config=model.config, dtype=torch.bfloat16)
            quantized_size, _ = compute_module_sizes(model, hf_quantizer, only_modules=False)
        names = sdnq_layer_names(model)
        assert names
        for name in names:  # from 16 bits to 8 bits (the scales are counted on their own)
            assert quantized_size[f"{name}.weight"] == model_size[f"{name}.weight"] // 2, name
        assert model_size[""] > quantized_size[""]

    # ------------------------------------------------------------------ device maps and moves
    @pytest.mark.parametrize("device_map", ["cpu", "auto", {"": "cpu"}])
    def test_device_map(self, device_map):
        model = self.load_quantized(weights_dtype="uint4", load_kwargs={"device_map": device_map})
        reference = self.load_quantized(weights_dtype="uint4")
        assert model.device.type == "cpu"
        assert stored_bytes(model) == stored_bytes(reference)
        assert torch.equal(self.logits(model), self.logits(reference))

    def test_quantized_model_offload(self, tmp_path):
        """quanto ``QuantoQuantizationOffloadTest`` / torchao ``test_int4wo_offload``: cpu and disk entries."""
        model = self.load_quantized(weights_dtype="int8", load_kwargs={"device_map": self.offload_device_map,
                                                                       "offload_folder": str(tmp_path)})
        assert set(model.hf_device_map.values()) == {"cpu", "disk"}
        err = relative_error(self.logits(model), self.logits(self.load_dense()))
        assert err <= 0.05

    def test_save_pretrained_offload(self, tmp_path):
        """fp8 ``test_save_pretrained_offload``: a saved SDNQ checkpoint loads with cpu/disk offload."""
        model = self.load_quantized(weights_dtype="uint4")
        model.save_pretrained(str(tmp_path / "ckpt"))
        offloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ckpt"), device_map=self.offload_device_map,
                                                         offload_folder=str(tmp_path / "offload")).eval()
        assert torch.equal(self.logits(offloaded), self.logits(model))

    def test_quantized_model_to_new_device_and_new_dtype(self):
        """hqq: ``.to(dtype)`` casts dense parameters only; the stored SDNQ tensors keep their dtypes and bytes."""
        model = self.load_quantized(weights_dtype="uint4")
        before = stored_bytes(model)
        model.to(torch.bfloat16)
        assert stored_bytes(model) == before
        assert model.lm_head.weight.dtype == torch.bfloat16
        twin = dense_twin(model)
        assert_close_to_twin(self.logits(model), self.logits(twin), atol=2e-2, rtol=2e-2)
        model.to("cpu")
        assert stored_bytes(model) == before

    def test_dequantize_after_dtype_cast(self):
        """hqq's ``.to(new dtype)`` then bnb's ``dequantize()``: the dense layers come out in the model's new dtype
        (the SDNQ layers' compute dtype follows the cast), so the dequantized model still runs."""
        model = self.load_quantized(weights_dtype="uint4")
        model.to(torch.bfloat16)
        name = sorted(sdnq_layer_names(model))[0]
        assert model.get_submodule(name).dequantize_weight().dtype == torch.bfloat16
        logits = self.logits(model)
        model.dequantize()
        assert all(m.weight.dtype == torch.bfloat16 for m in model.modules() if isinstance(m, nn.Linear))
        assert_close_to_twin(self.logits(model), logits, atol=2e-2, rtol=2e-2)

    @needs_cuda
    def test_generate_quality_cuda(self):
        model = self.load_quantized(weights_dtype="uint4")
        twin = dense_twin(model)
        model.to("cuda")
        assert torch.equal(self.generate(model), self.generate(twin))

    # ------------------------------------------------------------------ dequantize, compile
    def test_dequantize(self):
        model = self.load_quantized(weights_dtype="uint4", use_svd=True, svd_rank=4)
        logits = self.logits(model)
        model.dequantize()
        assert not sdnq_layer_names(model)
        assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))
        assert_close_to_twin(self.logits(model), logits)

    def test_is_compileable(self):
        assert self.load_quantized().hf_quantizer.is_compileable

    def test_torch_compile(self):
        torch.compiler.reset()
        model = self.load_quantized(weights_dtype="uint4")
        expected = self.logits(model)
        compiled = torch.compile(model.forward, fullgraph=True, backend=COMPILE_BACKEND)
        with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
            out = compiled(input_ids=self.input_ids).logits
            again = compiled(input_ids=self.input_ids).logits
        torch.compiler.reset()
        assert_close_to_twin(out, expected, atol=1e-5, rtol=1e-5)
        assert torch.equal(out, again)

    # ------------------------------------------------------------------ training (bnb test_training)
    def test_training(self):
        model = self.load_quantized(weights_dtype="uint4", load_kwargs={"dtype": torch.bfloat16})
        before = stored_bytes(model)
        for param in model.parameters():
            param.requires_grad = False
            if param.ndim == 1 and param.is_floating_point():  # 1-D packed codes stay as they are
                param.data = param.data.to(torch.float32)
        wrapped = []
        for name, module in model.named_modules():
            for attr in ("q_proj", "v_proj"):
                child = getattr(module, attr, None)
                if isinstance(child, SDNQLayerMixin):
                    setattr(module, attr, LoRALayer(child, rank=4))
                    wrapped.append(f"{name}.{attr}")
        assert wrapped
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids=self.input_ids).logits
            out.float().norm().backward()
        for module in model.modules():
            if isinstance(module, LoRALayer):
                assert module.adapter[1].weight.grad is not None and module.adapter[1].weight.grad.norm() > 0
        assert sorted(stored_bytes(model).values()) == sorted(before.values())


# ====================================================================================================== model classes
@pytest.fixture(scope="class")
def _qwen3_dense(request, fixtures_root: Path):
    request.cls.dense_path = str(get_fixture("qwen3", "dense", fixtures_root))


class TestQwen3SDNQ(SDNQTransformersTesterMixin):
    offload_device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                          "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}

    @pytest.fixture(autouse=True)
    def _paths(self, _qwen3_dense):
        pass

    def test_pipeline(self):
        """bnb ``Pipeline4BitTest``: a text-generation pipeline on the quantized model writes what the dense twin's
        pipeline writes."""
        tokenizer = AutoTokenizer.from_pretrained(self.dense_path)
        model = self.load_quantized(weights_dtype="uint4")
        kwargs = {"max_new_tokens": MAX_NEW_TOKENS, "do_sample": False}
        ours = pipeline("text-generation", model=model, tokenizer=tokenizer)(PROMPT, **kwargs)
        twin = pipeline("text-generation", model=dense_twin(model), tokenizer=tokenizer)(PROMPT, **kwargs)
        assert ours == twin and ours[0]["generated_text"].startswith(PROMPT)

    @pytest.mark.parametrize("variant", ["int8", "uint4_svd"])
    def test_config_from_pretrained(self, fixtures_root: Path, variant: str):
        """bnb ``test_config_from_pretrained`` / quanto ``test_load_from_quanto_saved``: a checkpoint written by
        the reference ``sdnq`` loads quantized from its config alone and generates like its dense twin."""
        model = AutoModelForCausalLM.from_pretrained(str(get_fixture("qwen3", variant, fixtures_root))).eval()
        assert isinstance(model.hf_quantizer, SDNQHfQuantizer) and sdnq_layer_names(model)
        twin = dense_twin(model)
        assert torch.equal(self.generate(model), self.generate(twin))
        assert_close_to_twin(self.logits(model), self.logits(twin))

    def test_float8_fnuz_round_trip(self, tmp_path):
        """fp8 checkpoints of the "fnuz" kinds (AMD Instinct): ``F8_E4M3FNUZ`` safetensors entries load back."""
        model = self.load_quantized(weights_dtype="float8_e4m3fnuz")
        model.save_pretrained(str(tmp_path))
        loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
        assert stored_bytes(loaded) == stored_bytes(model)
        assert torch.equal(self.logits(loaded), self.logits(model))


@pytest.fixture(scope="module")
def _opt_dense(tmp_path_factory) -> str:
    """A tiny OPT (biases, LayerNorm, tied head), built offline from a config."""
    path = tmp_path_factory.mktemp("tiny_opt")
    torch.manual_seed(0)
    config = OPTConfig(vocab_size=288, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=2,
                       max_position_embeddings=64, word_embed_proj_dim=64, pad_token_id=0, bos_token_id=1,
                       eos_token_id=2, tie_word_embeddings=True)
    model = OPTForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.02)
    model.save_pretrained(str(path))
    return str(path)


class TestOPTSDNQ(SDNQTransformersTesterMixin):
    offload_device_map = {"model.decoder.embed_tokens": "cpu", "model.decoder.embed_positions": "cpu",
                          "model.decoder.final_layer_norm": "cpu", "model.decoder.layers.0": "cpu",
                          "model.decoder.layers.1": "disk", "lm_head": "cpu"}

    @pytest.fixture(autouse=True)
    def _paths(self, _opt_dense):
        type(self).dense_path = _opt_dense

    def test_tied_head_is_not_converted(self):
        """bnb ``test_get_keys_to_not_convert``: the tied output head stays dense and tied to the embedding."""
        model = self.load_quantized()
        assert not isinstance(model.lm_head, SDNQLayerMixin)
        assert model.lm_head.weight is model.model.decoder.embed_tokens.weight


# ====================================================================================================== keep in fp32
def test_fp32_conversion(fixtures_root: Path):
    """bnb ``test_fp32_4bit_conversion``: T5's ``_keep_in_fp32_modules`` ("wo") stay dense float32 under fp16."""
    root = get_fixture("flux1", "dense", fixtures_root)
    model = T5EncoderModel.from_pretrained(str(root), subfolder="text_encoder_2", dtype=torch.float16,
                                           quantization_config=sdnq_config(weights_dtype="uint4"))
    wo = [m for n, m in model.named_modules() if n.endswith("DenseReluDense.wo")]
    assert wo and all(type(m) is nn.Linear and m.weight.dtype == torch.float32 for m in wo)
    assert sdnq_layer_names(model)
    ids = torch.tensor([[4, 5, 6, 1]])
    with torch.no_grad():
        out = model(input_ids=ids).last_hidden_state
        ref = dense_twin(model)(input_ids=ids).last_hidden_state
    assert_close_to_twin(out, ref, atol=1e-2, rtol=1e-2)


def test_original_dtype_and_dtype_argument(fixtures_root: Path):
    """bnb ``test_original_dtype``: the model dtype follows ``dtype=``; stored companions keep float32 scales."""
    path = get_fixture("qwen3", "dense", fixtures_root)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16,
                                                 quantization_config=sdnq_config(weights_dtype="int8"))
    assert model.dtype == torch.bfloat16 and model.lm_head.weight.dtype == torch.bfloat16
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.weight.dtype == torch.int8 and layer.scale.dtype == torch.float32
    assert layer.compute_dtype == torch.bfloat16


def test_registered_quantizer_is_ours():
    """Every SDNQ ``from_pretrained`` goes through diffusers-sdnq's quantizer, whatever else is installed."""
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

    assert AUTO_QUANTIZER_MAPPING["sdnq"] is SDNQHfQuantizer
    assert isinstance(AutoHfQuantizer.from_config(sdnq_config(weights_dtype="int8")), SDNQHfQuantizer)
