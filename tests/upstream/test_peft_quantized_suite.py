"""PEFT's tests for adapters on quantized base layers, ported to SDNQ base layers (tiny models, CPU).

Ported from huggingface/peft (Apache-2.0), read in the code index (peft 0.21.2 runs here):
``tests/test_common_gpu.py`` (``PeftGPUCommonTests``: ``test_lora_bnb_*_quantization_from_pretrained_safetensors``,
``test_{4,8}bit_merge_lora``, ``..._merge_and_disable_lora``, ``..._merge_lora_with_bias``,
``..._lora_mixed_adapter_batches_lora``, ``..._dora_inference``, ``..._dora_merging``, ``test_print_4bit_expected``,
``test_modules_to_save_grad``, the IA3 / VeRA / RandLoRA / RoAd bnb variants) and ``tests/test_gpu_examples.py``
(``PeftBnbGPUExampleTests`` / ``PeftHqqGPUTests`` / ``PeftTorchaoGPUTests`` / ``PeftEetqGPUTests`` /
``PeftAwqGPUTests`` training, ``test_hqq_lora_model_outputs``, ``test_torchao_merge_layers_*``,
``TestOffloadSave``, ``TestLoftQ`` / ``TestPiSSA`` / ``TestOLoRA``, ``TestLowCpuMemUsageDifferentDevices``,
``TestHotSwapping``).

Adaptations. The base is the tiny Qwen3 of ``tests/tiny_models.py``, quantized while loading (int8, uint4) or
written by the reference ``sdnq`` (uint4 + SVD). Upstream compares merged and unmerged outputs of the same
quantized model with loose tolerances; here each result is also compared with the dense twin (the same weights
dequantized, PEFT's stock dense LoRA layers, the same adapter tensors), and merges are checked against the
requantization bound. Training uses a few plain AdamW steps instead of ``Trainer`` runs on hub datasets.

Not applicable to SDNQ by design (with the reason):

* IA3 / VeRA / RandLoRA / RoAd / AdaLoRA on quantized layers -- they read or rewrite ``base_layer.weight`` as a
  dense matrix; diffusers-sdnq refuses them with ``SDNQAdapterError`` (``docs/lora.md``), which is ported as
  ``test_other_tuners_are_refused``.
* LoftQ / PiSSA / OLoRA / EVA initialisation -- rewrite or read the base weight; refused with a clear error
  (``test_weight_rewriting_initialisations_are_refused``). Dequantize the model first to use them.
* ``test_dora_ephemeral_gpu_offload`` -- a CUDA feature for dense DoRA weights kept on the CPU; SDNQ's DoRA
  rebuilds its column norms from the quantized weight on the layer's own device.
* bnb 8-bit optimizer states, FSDP / DDP wrapping (``TestFSDPWrap``, multi-GPU ``Trainer`` runs) -- need
  bitsandbytes optimizers or several devices; nothing in them is specific to the base layer's format.
* ``AdaptionPrompt`` (``test_adaption_prompt_4bit``) -- patches attention of a fixed list of architectures and
  never touches the quantized linears.
* GPTQ / AQLM / AWQ / EETQ / HQQ kernel checks -- those formats' kernels.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import (
    IA3Config,
    LoraConfig,
    PeftModel,
    VeraConfig,
    get_peft_model,
    get_peft_model_state_dict,
    prepare_model_for_kbit_training,
    set_peft_model_state_dict,
)
from peft.tuners.tuners_utils import BaseTunerLayer
from tiny_models import get_fixture
from torch import nn
from transformers import AutoModelForCausalLM
from upstream_helpers import (
    assert_close_to_twin,
    assert_within_half_step,
    dense_twin,
    needs_cuda,
    one_thread,  # noqa: F401  (an autouse fixture: one torch thread)
    relative_error,
    sdnq_layer_names,
    stored_bytes,
)

from diffusers_sdnq.integrations.peft import SDNQAdapterError, SDNQFuseError, SDNQLoraLinear
from diffusers_sdnq.integrations.transformers import SDNQTransformersConfig
from diffusers_sdnq.layers import SDNQLayerMixin, SDNQLinear

IDS = torch.randint(3, 280, (9, 12), generator=torch.Generator().manual_seed(0))
RANDOM_INPUT = torch.LongTensor([[1, 0, 1, 0, 1, 0]])


@pytest.fixture(scope="module")
def tiny_opt(tmp_path_factory) -> str:
    """A tiny OPT with biases (for ``lora_bias``), built offline from a config."""
    from transformers import OPTConfig, OPTForCausalLM

    path = tmp_path_factory.mktemp("peft_tiny_opt")
    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(vocab_size=288, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                     num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=64,
                                     pad_token_id=0, bos_token_id=1, eos_token_id=2))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.02)
    model.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def qwen3(fixtures_root: Path) -> dict[str, Path]:
    return {v: get_fixture("qwen3", v, fixtures_root) for v in ("dense", "uint4_svd")}


def load_base(paths: dict[str, Path], kind: str, dtype: torch.dtype = torch.float32, **kwargs):
    """``kind``: "int8" / "uint4" (quantized while loading) or "uint4_svd" (written by the reference sdnq)."""
    if kind in paths:
        return AutoModelForCausalLM.from_pretrained(str(paths[kind]), dtype=dtype, **kwargs).eval()
    config = SDNQTransformersConfig(weights_dtype=kind, minimum_allowed_numel=0)
    return AutoModelForCausalLM.from_pretrained(str(paths["dense"]), dtype=dtype, quantization_config=config,
                                                **kwargs).eval()


def logits(model, ids: torch.Tensor = IDS, **kwargs) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids, **kwargs).logits.clone()


def peft_pair(base, config: LoraConfig, seed: int = 0):
    """The quantized PEFT model and its dense twin carrying the very same adapter tensors."""
    twin = dense_twin(base)
    torch.manual_seed(seed)
    quantized = get_peft_model(base, copy.deepcopy(config)).eval()
    dense = get_peft_model(twin, copy.deepcopy(config)).eval()
    result = set_peft_model_state_dict(dense, get_peft_model_state_dict(quantized))
    assert not result.unexpected_keys
    return quantized, dense


def sdnq_tuners(model) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules()
            if isinstance(m, BaseTunerLayer) and isinstance(m.get_base_layer(), SDNQLayerMixin)}


def randomize_dora_magnitude(model, seed: int = 0) -> None:
    """Upstream: "DoRA is a no-op before training ... we need to change the magnitude vector"."""
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, BaseTunerLayer) and "default" in getattr(module, "lora_magnitude_vector", {}):
            vector = module.lora_magnitude_vector["default"]
            vector.weight = nn.Parameter(10 * torch.rand(vector.weight.shape, generator=gen))


def copy_magnitudes(src, dst) -> None:
    dst_modules = dict(dst.named_modules())
    for name, module in src.named_modules():
        if isinstance(module, BaseTunerLayer) and "default" in getattr(module, "lora_magnitude_vector", {}):
            dst_modules[name].lora_magnitude_vector["default"].weight = nn.Parameter(
                module.lora_magnitude_vector["default"].weight.detach().clone())


# ====================================================================================================== forward
@pytest.mark.parametrize("kind", ["int8", "uint4", "uint4_svd"])
def test_lora_quantization_from_pretrained_safetensors(qwen3, tmp_path, kind):
    """``test_lora_bnb_*_quantization_from_pretrained_safetensors``: adapter on a quantized base, saved, loaded onto a
    fresh quantized base with ``PeftModel.from_pretrained``, a second adapter loaded next to it."""
    base = prepare_model_for_kbit_training(load_base(qwen3, kind), use_gradient_checkpointing=False)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                        task_type="CAUSAL_LM")
    peft_model, twin = peft_pair(base, config)
    assert all(type(m) is SDNQLoraLinear for m in sdnq_tuners(peft_model).values()) and sdnq_tuners(peft_model)
    expected = logits(peft_model)
    assert_close_to_twin(expected, logits(twin))
    peft_model.generate(input_ids=RANDOM_INPUT, max_new_tokens=2, do_sample=False, pad_token_id=0)

    peft_model.save_pretrained(str(tmp_path))
    saved = set(get_peft_model_state_dict(peft_model))
    assert saved and all("lora_" in k for k in saved)  # adapters only: no base tensor is written

    model = PeftModel.from_pretrained(load_base(qwen3, kind), str(tmp_path)).eval()
    assert torch.equal(logits(model), expected)
    model.load_adapter(str(tmp_path), "adapter2")
    model.set_adapter("adapter2")
    assert torch.equal(logits(model), expected)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert "default" in q_proj.lora_A and "adapter2" in q_proj.lora_A
    assert isinstance(q_proj, SDNQLoraLinear)


def test_low_cpu_mem_usage_and_hotswap(qwen3, tmp_path):
    """``TestLowCpuMemUsageDifferentDevices`` / ``TestHotSwapping``: an adapter loaded with ``low_cpu_mem_usage``
    (tensors made on meta, then filled) and one hot-swapped in place give the saving models' outputs exactly."""
    from peft.utils.hotswap import hotswap_adapter

    config = LoraConfig(r=8, init_lora_weights=False, target_modules=["q_proj", "v_proj"])
    expected = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        saved = get_peft_model(load_base(qwen3, "uint4"), copy.deepcopy(config)).eval()
        saved.save_pretrained(str(tmp_path / f"a{seed}"))
        expected.append(logits(saved))
    model = PeftModel.from_pretrained(load_base(qwen3, "uint4"), str(tmp_path / "a0"), low_cpu_mem_usage=True).eval()
    assert isinstance(model.base_model.model.model.layers[0].self_attn.q_proj, SDNQLoraLinear)
    assert torch.equal(logits(model), expected[0])
    hotswap_adapter(model, str(tmp_path / "a1"), adapter_name="default")
    assert torch.equal(logits(model), expected[1])


def test_hqq_lora_model_outputs(qwen3):
    """``PeftHqqGPUTests.test_hqq_lora_model_outputs``: with default (identity) init the adapter changes nothing;
    with random B the output moves and equals the dense twin's (stock PEFT layers, same adapter tensors)."""
    base = load_base(qwen3, "uint4")
    out_base = logits(base)
    model, twin = peft_pair(base, LoraConfig(r=8, target_modules="all-linear"))
    assert torch.equal(logits(model), out_base)
    for module in sdnq_tuners(model).values():
        nn.init.normal_(module.lora_B["default"].weight, std=0.05)
    set_peft_model_state_dict(twin, get_peft_model_state_dict(model))
    assert not any(isinstance(m, SDNQLayerMixin) for m in twin.modules())
    out = logits(model)
    assert relative_error(out, out_base) > 1e-3
    assert_close_to_twin(out, logits(twin))


@pytest.mark.parametrize("kind", ["int8", "uint4_svd"])
def test_dora_inference(qwen3, kind):
    """``test_{4,8}bit_dora_inference``: DoRA at init equals LoRA (same seed); with a trained-looking magnitude
    it equals the dense twin's DoRA."""
    torch.manual_seed(0)
    lora = get_peft_model(load_base(qwen3, kind), LoraConfig(r=8, init_lora_weights=False)).eval()
    torch.manual_seed(0)
    dora_config = LoraConfig(r=8, init_lora_weights=False, use_dora=True)
    dora, twin = peft_pair(load_base(qwen3, kind), dora_config)
    torch.testing.assert_close(logits(dora), logits(lora), atol=1e-4, rtol=1e-4)
    randomize_dora_magnitude(dora)
    copy_magnitudes(dora, twin)
    out = logits(dora)
    assert relative_error(out, logits(lora)) > 1e-2
    assert_close_to_twin(out, logits(twin))


# ====================================================================================================== merging
# Upstream's tolerances on softmax outputs after a merge (bnb 8-bit: atol 1e-3, rtol 1; 4-bit: atol 0.01, rtol 10).
# The exact check is per layer: each merged weight is within half a quantization step of the dense twin's W + BA.
UPSTREAM_MERGE_TOL = {"int8": {"atol": 1e-3, "rtol": 1.0}, "uint4": {"atol": 1e-2, "rtol": 10.0}}


def assert_merged_layers_on_grid(merged, twin_merged) -> int:
    """Every SDNQ layer of ``merged`` holds round-to-nearest codes of the twin's merged dense weight."""
    dense = {n.removeprefix("base_model.model."): m for n, m in twin_merged.named_modules()
             if isinstance(m, nn.Linear) and not isinstance(m, BaseTunerLayer)}
    count = 0
    for name, layer in merged.named_modules():
        if isinstance(layer, SDNQLayerMixin):
            clean = name.replace(".base_layer", "").removeprefix("base_model.model.")
            assert_within_half_step(layer, dense[clean].weight.detach(), clean)
            count += 1
    assert count
    return count


def assert_softmax_close(got, want, kind: str) -> None:
    assert torch.allclose(got, want, **UPSTREAM_MERGE_TOL[kind]), (got - want).abs().max()


def _merge_lora(base, twin_base, kind: str, config: LoraConfig):
    torch.manual_seed(1000)
    out_base = logits(base, RANDOM_INPUT)
    model, twin = peft_pair(base, config)
    before_merge = logits(model, RANDOM_INPUT)
    assert_close_to_twin(before_merge, logits(twin, RANDOM_INPUT))
    merged = model.merge_and_unload()
    twin_merged = twin.merge_and_unload()
    after_merge = logits(merged, RANDOM_INPUT)
    assert relative_error(before_merge, out_base) > 1e-2  # sanity check: the adapter changes the output
    assert_softmax_close(F.softmax(after_merge, dim=-1), F.softmax(before_merge, dim=-1), kind)
    assert_merged_layers_on_grid(merged, twin_merged)
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    return merged


@pytest.mark.parametrize("kind", ["int8", "uint4"])
def test_merge_lora(qwen3, kind):
    """``test_{4,8}bit_merge_lora``: merge_and_unload requantizes W + BA into each layer's own layout (within half
    a step of the dense twin's merged weight), keeps SDNQ layers, and the output stays close."""
    merged = _merge_lora(load_base(qwen3, kind), None, kind, LoraConfig(r=8, init_lora_weights=False))
    assert type(merged.model.layers[0].self_attn.q_proj) is SDNQLinear


@pytest.mark.parametrize("kind", ["int8", "uint4"])
def test_merge_lora_with_bias(tiny_opt, kind):
    """``test_{4,8}bit_merge_lora_with_bias``: ``lora_bias=True`` merges its bias into the layer's dense bias."""
    base = AutoModelForCausalLM.from_pretrained(tiny_opt, quantization_config=SDNQTransformersConfig(
        weights_dtype=kind, minimum_allowed_numel=0)).eval()
    merged = _merge_lora(base, None, kind, LoraConfig(r=8, init_lora_weights=False, lora_bias=True,
                                                      target_modules=["q_proj", "v_proj", "fc1"]))
    assert type(merged.model.decoder.layers[0].self_attn.q_proj) is SDNQLinear


@pytest.mark.parametrize("kind", ["int8", "uint4"])
def test_merge_and_disable_lora(qwen3, kind):
    """``test_{4,8}bit_merge_and_disable_lora``: after ``merge_adapter`` a disabled adapter gives the base output
    exactly (the original stored tensors are put back, not re-derived)."""
    base = load_base(qwen3, kind)
    before_bytes = stored_bytes(base)
    out_base = logits(base, RANDOM_INPUT)
    model = get_peft_model(base, LoraConfig(r=8, init_lora_weights=False))
    out_before = logits(model, RANDOM_INPUT)
    model.merge_adapter()
    assert stored_bytes(model) != before_bytes
    with model.disable_adapter():
        out_after = logits(model, RANDOM_INPUT)
    assert relative_error(out_before, out_base) > 1e-3
    assert torch.equal(out_after, out_base)
    assert stored_bytes(model) == before_bytes
    assert isinstance(model.base_model.model.model.layers[0].self_attn.q_proj, SDNQLoraLinear)


@pytest.mark.parametrize("kind", ["int8", "uint4"])
def test_safe_merge(qwen3, kind):
    """``merge(safe_merge=True)`` gives the same bytes as a plain merge; a broken (NaN) adapter is refused and
    leaves the base untouched."""
    results = []
    for safe in (False, True):
        torch.manual_seed(0)  # the same random adapter both times
        model = get_peft_model(load_base(qwen3, kind), LoraConfig(r=8, init_lora_weights=False,
                                                                  target_modules=["q_proj", "down_proj"]))
        model.merge_adapter(safe_merge=safe)
        results.append(stored_bytes(model))
    assert results[0] == results[1]
    model = get_peft_model(load_base(qwen3, kind), LoraConfig(r=8, init_lora_weights=False,
                                                              target_modules=["q_proj"]))
    before = stored_bytes(model)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    layer.lora_B["default"].weight.data[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        layer.merge(safe_merge=True)
    assert stored_bytes(model) == before and not layer.merged


@pytest.mark.parametrize("kind", ["int8", "uint4"])
def test_dora_merging(qwen3, kind):
    """``test_{4,8}bit_dora_merging``: merge, unmerge, merge_and_unload of DoRA; unmerge restores the bytes."""
    torch.manual_seed(0)
    base = load_base(qwen3, kind)
    before_bytes = stored_bytes(base)
    out_base = F.softmax(logits(base, RANDOM_INPUT), dim=-1)
    model, twin = peft_pair(base, LoraConfig(r=8, init_lora_weights=False, use_dora=True))
    randomize_dora_magnitude(model)
    copy_magnitudes(model, twin)
    out_dora = F.softmax(logits(model, RANDOM_INPUT), dim=-1)
    assert_close_to_twin(out_dora, F.softmax(logits(twin, RANDOM_INPUT), dim=-1))
    model.merge_adapter()
    out_merged = F.softmax(logits(model, RANDOM_INPUT), dim=-1)
    model.unmerge_adapter()
    assert stored_bytes(model) == before_bytes
    out_unmerged = F.softmax(logits(model, RANDOM_INPUT), dim=-1)
    unloaded = model.merge_and_unload()
    out_unloaded = F.softmax(logits(unloaded, RANDOM_INPUT), dim=-1)
    assert_merged_layers_on_grid(unloaded, twin.merge_and_unload())
    assert not torch.allclose(out_base, out_dora, atol=UPSTREAM_MERGE_TOL[kind]["atol"], rtol=0)
    assert_softmax_close(out_merged, out_dora, kind)
    torch.testing.assert_close(out_unmerged, out_dora, atol=1e-6, rtol=0)
    torch.testing.assert_close(out_unloaded, out_merged, atol=1e-6, rtol=0)


def test_merge_layers_unsupported_layout_raises(qwen3):
    """``test_torchao_merge_layers_int4_raises``: a layout that requantizing cannot reproduce (SVD) refuses to merge,
    saying what to do, and changes nothing."""
    model = get_peft_model(load_base(qwen3, "uint4_svd"), LoraConfig(r=8, init_lora_weights=False))
    before = stored_bytes(model)
    out = logits(model, RANDOM_INPUT)
    with pytest.raises(SDNQFuseError, match="dequantize_model"):
        model.merge_adapter()
    model.unmerge_adapter()  # what merged before the refusing layer is restored
    assert stored_bytes(model) == before
    assert torch.equal(logits(model, RANDOM_INPUT), out)


# ====================================================================================================== adapters
def test_lora_mixed_adapter_batches_lora(qwen3):
    """``test_4bit_lora_mixed_adapter_batches_lora``: per-sample ``adapter_names`` equal the single-adapter runs."""
    torch.manual_seed(3000)
    base = load_base(qwen3, "uint4")
    out_base = logits(base)
    model = get_peft_model(base, LoraConfig(r=8, init_lora_weights=False)).eval()
    out_adapter0 = logits(model)
    model.add_adapter("adapter1", LoraConfig(r=16, init_lora_weights=False))
    model.set_adapter("adapter1")
    out_adapter1 = logits(model)
    atol, rtol = 3e-5, 1e-5
    assert len(out_base) >= 3 and len(out_base) == len(out_adapter0) == len(out_adapter1)
    assert not torch.allclose(out_base, out_adapter0, atol=atol, rtol=rtol)
    assert not torch.allclose(out_base, out_adapter1, atol=atol, rtol=rtol)
    assert not torch.allclose(out_adapter0, out_adapter1, atol=atol, rtol=rtol)
    adapters = ["__base__", "default", "adapter1"]
    out_mixed = logits(model, adapter_names=[adapters[i % 3] for i in range(len(IDS))])
    torch.testing.assert_close(out_mixed[::3], out_base[::3], atol=atol, rtol=rtol)
    torch.testing.assert_close(out_mixed[1::3], out_adapter0[1::3], atol=atol, rtol=rtol)
    torch.testing.assert_close(out_mixed[2::3], out_adapter1[2::3], atol=atol, rtol=rtol)


def test_multiple_adapters_and_disable(qwen3):
    """Two adapters, ``set_adapter``, weighted ``add_weighted_adapter`` and ``disable_adapter`` against the twin."""
    base = load_base(qwen3, "int8")
    out_base = logits(base)
    model, twin = peft_pair(base, LoraConfig(r=4, init_lora_weights=False, target_modules="all-linear"))
    second = LoraConfig(r=4, init_lora_weights=False, target_modules=["q_proj", "up_proj"])
    model.add_adapter("second", copy.deepcopy(second))
    twin.add_adapter("second", copy.deepcopy(second))
    set_peft_model_state_dict(twin, get_peft_model_state_dict(model, adapter_name="second"), adapter_name="second")
    for name in ("default", "second"):
        model.set_adapter(name)
        twin.set_adapter(name)
        assert_close_to_twin(logits(model), logits(twin))
    with model.disable_adapter():
        assert torch.equal(logits(model), out_base)
    model.delete_adapter("second")
    model.set_adapter("default")
    twin.set_adapter("default")
    assert_close_to_twin(logits(model), logits(twin))


def test_modules_to_save_grad(qwen3):
    """``test_modules_to_save_grad``: a dense head in ``modules_to_save`` trains its copy only."""
    model = prepare_model_for_kbit_training(load_base(qwen3, "uint4"), use_gradient_checkpointing=False)
    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    head = peft_model.base_model.model.lm_head
    out = head(torch.randn(2, head.original_module.in_features))
    out.mean().backward()
    assert head.modules_to_save.default.weight.requires_grad
    assert head.original_module.weight.grad is None and head.modules_to_save.default.weight.grad is not None


def test_print_4bit_expected(qwen3):
    """``test_print_4bit_expected``: trainable = the LoRA tensors, all = dense base parameters + LoRA (bnb's
    packed 4-bit parameters are counted at their dense size; SDNQ's must be too)."""
    dense = load_base(qwen3, "dense")
    model = get_peft_model(load_base(qwen3, "uint4"), LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    lora = sum(8 * (m.in_features + m.out_features) for n, m in dense.named_modules()
               if n.endswith(("q_proj", "v_proj")))
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == lora
    assert total == dense.num_parameters() + lora


# ====================================================================================================== training
@pytest.mark.parametrize("kind,use_dora,checkpointing", [("uint4", False, False), ("uint4_svd", False, True),
                                                         ("int8", True, False)])
def test_causal_lm_training(qwen3, kind, use_dora, checkpointing):
    """``test_causal_lm_training_*`` (bnb / hqq / torchao / eetq / awq): a few optimizer steps lower the loss and
    change the adapters only; every stored tensor keeps its bytes and no gradient reaches it."""
    model = prepare_model_for_kbit_training(load_base(qwen3, kind, dtype=torch.bfloat16),
                                            use_gradient_checkpointing=checkpointing)
    before = stored_bytes(model)
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0, use_dora=use_dora,
                        task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    model.train()
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    ids = IDS[:4]
    losses = []
    for _ in range(6):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    changed = [n for n, p in model.named_parameters() if n in trainable and not torch.equal(p, trainable[n])]
    assert changed
    for module in model.modules():
        if isinstance(module, SDNQLayerMixin):
            assert all(t.grad is None and not t.requires_grad for t in module.sdnq_tensors().values())
    assert stored_bytes(model) == before


def test_autocast_adapter_dtype(qwen3):
    """PEFT keeps adapters in float32 on a bfloat16 base (``autocast_adapter_dtype=True``) or in the base's dtype
    when asked; the quantized base's compute dtype is what it reads."""
    config = LoraConfig(r=8, target_modules=["q_proj"], init_lora_weights=False)
    upcast = get_peft_model(load_base(qwen3, "uint4", dtype=torch.bfloat16), copy.deepcopy(config))
    plain = get_peft_model(load_base(qwen3, "uint4", dtype=torch.bfloat16), copy.deepcopy(config),
                           autocast_adapter_dtype=False)
    for model, want in ((upcast, torch.float32), (plain, torch.bfloat16)):
        layer = model.base_model.model.model.layers[0].self_attn.q_proj
        assert layer.lora_A["default"].weight.dtype == want
        assert logits(model, RANDOM_INPUT).dtype == torch.bfloat16


# ====================================================================================================== offload, refusals
@needs_cuda
def test_offload_load_and_merge(qwen3, tmp_path):
    """``TestOffloadSave.test_offload_load`` / ``test_offload_merge`` (GPU tests upstream): a quantized base with cpu
    and disk entries in its device map takes an adapter, and merge_and_unload gives the in-memory result. Not on a
    CPU-only machine: there ``PeftModel.from_pretrained`` re-dispatches the model with an automatic map that puts
    everything on the CPU and moves the disk-offloaded (meta) weights with ``.to()``, which fails for a dense Qwen3
    just the same ("Cannot copy out of meta tensor")."""
    config = LoraConfig(r=8, init_lora_weights=False, target_modules=["q_proj", "v_proj"])
    reference = get_peft_model(load_base(qwen3, "uint4_svd"), copy.deepcopy(config)).eval()
    reference.save_pretrained(str(tmp_path / "adapter"))
    expected = logits(reference, RANDOM_INPUT)
    device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": "disk",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    base = load_base(qwen3, "uint4_svd", device_map=device_map, offload_folder=str(tmp_path / "offload"))
    model = PeftModel.from_pretrained(base, str(tmp_path / "adapter"), offload_folder=str(tmp_path / "o2")).eval()
    assert_close_to_twin(logits(model, RANDOM_INPUT), expected)


def test_other_tuners_are_refused(qwen3):
    """IA3 / VeRA on SDNQ layers (``test_ia3_bnb_*``, ``test_vera_bnb_*``): refused, naming the tuner, instead of
    reading the packed codes as a dense weight."""
    for config in (IA3Config(target_modules=["q_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
                   VeraConfig(r=4, target_modules=["q_proj", "v_proj"])):
        with pytest.raises(SDNQAdapterError, match=type(config).__name__.removesuffix("Config")):
            get_peft_model(load_base(qwen3, "int8"), config)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_weight_rewriting_initialisations_are_refused(qwen3, init):
    """``TestPiSSA`` / ``TestOLoRA``: initialisations that rewrite the base weight are refused, naming the option,
    before anything is changed. (``TestLoftQ``: PEFT itself needs scipy for LoftQ before any layer is built; the
    same refusal covers it.)"""
    base = load_base(qwen3, "int8")
    before = stored_bytes(base)
    with pytest.raises(SDNQAdapterError, match=init):
        get_peft_model(base, LoraConfig(r=8, target_modules=["q_proj"], init_lora_weights=init))
    assert stored_bytes(base) == before


@needs_cuda
def test_lora_on_cuda_matches_dense_twin(qwen3):
    """The GPU variants of the forward checks, when a CUDA device is present."""
    model, twin = peft_pair(load_base(qwen3, "uint4"), LoraConfig(r=8, init_lora_weights=False))
    expected = logits(twin)
    model.to("cuda")
    assert_close_to_twin(logits(model, IDS.cuda()).cpu(), expected, atol=1e-3, rtol=1e-3)
    assert sdnq_layer_names(model)
