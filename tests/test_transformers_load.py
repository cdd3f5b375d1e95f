"""transformers ``from_pretrained`` loads reference-written SDNQ checkpoints with diffusers-sdnq's layers.

The reference side (quantize a tiny Qwen3 with the ``sdnq`` package, save it, load it back with sdnq's own
transformers quantizer, dequantize it) runs in one subprocess; our side runs in another subprocess in which
``import sdnq`` is blocked, so the GPL package can never take part in what is being tested. This file is also
the script both subprocesses run (``python test_transformers_load.py reference|ours ROOT``).

Checked for every case and for ``dtype`` float32 and bfloat16: nothing missing / unexpected / mismatched;
every stored tensor equal (dtype and bits) to what the reference holds after its own load; every quantized
layer's ``dequantize_weight()`` bit-exact with the reference's dequantized weight; logits close; tied
``lm_head`` still tied and dense. Plus a save_pretrained round trip and the registry pinning.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CASES: dict[str, dict] = {
    "uint4_svd": {"model_dtype": "float32", "quant": {"weights_dtype": "uint4", "use_svd": True, "svd_rank": 8}},
    "int8": {"model_dtype": "bfloat16", "quant": {"weights_dtype": "int8"}},
    "mixed_nofp32": {
        "model_dtype": "bfloat16",
        "quant": {
            "weights_dtype": "uint4",
            "modules_dtype_dict": {"int8": ["down_proj"]},
            "modules_quant_config": {"q_proj": {"weights_dtype": "float8_e4m3fn"}},
            "dequantize_fp32": False,
        },
    },
    "dynamic": {
        "model_dtype": "float32",
        "quant": {"weights_dtype": "uint4", "use_dynamic_quantization": True, "dynamic_loss_threshold": 3e-3},
    },
}
LOAD_DTYPES = ("float32", "bfloat16")
ROUND_TRIP_CASE = "uint4_svd"
ENV = {"SDNQ_USE_TORCH_COMPILE": "0", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

needs_reference = pytest.mark.skipif(importlib.util.find_spec("sdnq") is None, reason="sdnq (test oracle) missing")


# ---------------------------------------------------------------------------------------------- helpers
def _tiny_qwen3(model_dtype: str):
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True,
                         max_position_embeddings=128)
    model = Qwen3ForCausalLM(config).eval()
    with torch.no_grad():  # uneven column scales so dynamic quantization picks different dtypes per layer
        model.model.layers[0].mlp.down_proj.weight.mul_(torch.linspace(0.01, 10, 256)[None] ** 2)
    return model.to(getattr(torch, model_dtype))


def _input_ids():
    import torch

    return (torch.arange(64).reshape(2, 32) * 7) % 256


def _run(mode: str, root: Path) -> None:
    env = {**os.environ, **ENV}
    proc = subprocess.run([sys.executable, __file__, mode, str(root)], env=env, capture_output=True, text=True,
                          timeout=300)
    if proc.returncode != 0:
        raise AssertionError(f"{mode} subprocess failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-6000:]}")


# ---------------------------------------------------------------------------------------------- script sides
def reference_side(root: Path) -> None:
    """Quantize, save, reload and dequantize every case with the reference package."""
    import torch
    from safetensors.torch import save_file
    from sdnq import save_sdnq_model, sdnq_post_load_quant
    from sdnq.dequantizer import dequantize_sdnq_model
    from transformers import AutoModelForCausalLM

    for case, spec in CASES.items():
        ckpt = root / case / "ckpt"
        model = _tiny_qwen3(spec["model_dtype"])
        model = sdnq_post_load_quant(model, minimum_allowed_numel=0, torch_dtype=getattr(torch, spec["model_dtype"]),
                                     **spec["quant"])
        save_sdnq_model(model, str(ckpt))
        for dtype in LOAD_DTYPES:
            loaded = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=getattr(torch, dtype)).eval()
            with torch.no_grad():
                out = {"logits": loaded(input_ids=_input_ids()).logits}
            out.update({f"stored::{k}": v for k, v in loaded.state_dict().items()})
            dense = dequantize_sdnq_model(loaded)
            out.update({f"dense::{k}": v for k, v in dense.state_dict().items()})
            save_file({k: v.detach().contiguous().clone() for k, v in out.items()}, str(root / case / f"ref_{dtype}.safetensors"))


def ours_side(root: Path) -> None:
    """Load every case with diffusers-sdnq (sdnq blocked) and write a JSON report for the test process."""
    sys.modules["sdnq"] = None  # any import of the GPL package now raises
    import tempfile

    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from diffusers_sdnq.integrations.transformers import SDNQHfQuantizer, is_registered, register
    from diffusers_sdnq.layers import sdnq_layers

    register()
    report: dict = {"registered": is_registered()}
    for case in CASES:
        ckpt = root / case / "ckpt"
        stored_file = load_file(str(ckpt / "model.safetensors"))
        qcfg = json.loads((ckpt / "config.json").read_text())["quantization_config"]
        for dtype in LOAD_DTYPES:
            ref = load_file(str(root / case / f"ref_{dtype}.safetensors"))
            model, info = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=getattr(torch, dtype),
                                                               output_loading_info=True)
            layers = sdnq_layers(model)
            stored_diff, dense_diff, companion_dtypes = [], [], set()
            for name, layer in layers.items():
                for key, value in layer.sdnq_tensors().items():
                    want = ref[f"stored::{name}.{key}"]
                    if value.dtype != want.dtype or not torch.equal(value, want):
                        stored_diff.append(f"{name}.{key}: ours {value.dtype} vs reference {want.dtype}")
                    if key in ("scale", "zero_point"):
                        companion_dtypes.add(str(value.dtype))
                weight, want = layer.dequantize_weight(), ref[f"dense::{name}.weight"]
                if weight.dtype != want.dtype or not torch.equal(weight, want):
                    err = (weight.float() - want.float()).abs().max().item() if weight.shape == want.shape else "shape"
                    dense_diff.append(f"{name}: {weight.dtype} vs {want.dtype}, max abs diff {err}")
            with torch.no_grad():
                logits = model(input_ids=_input_ids()).logits
            ref_logits = ref["logits"]
            entry = {
                "loading_info": {k: sorted(map(str, v)) for k, v in info.items() if v},
                "quantizer": type(getattr(model, "hf_quantizer", None)).__name__,
                "quantized_in_file": sorted(k[: -len(".scale")] for k in stored_file if k.endswith(".scale")),
                "layers": sorted(layers),
                "stored_diff": stored_diff,
                "dense_diff": dense_diff,
                "exact": len(layers) - len(dense_diff),
                "companion_dtypes": sorted(companion_dtypes),
                "dequantize_fp32": qcfg.get("dequantize_fp32"),
                "logits_max_abs_diff": (logits.float() - ref_logits.float()).abs().max().item(),
                "logits_scale": ref_logits.float().abs().max().item(),
                "lm_head_tied": model.lm_head.weight is model.model.embed_tokens.weight,
                "lm_head_class": type(model.lm_head).__name__,
                "sdnq_imported": sys.modules.get("sdnq") is not None,
                "is_sdnq_quantizer": isinstance(getattr(model, "hf_quantizer", None), SDNQHfQuantizer),
            }
            if case == ROUND_TRIP_CASE and dtype == "float32":
                with tempfile.TemporaryDirectory() as out:
                    model.save_pretrained(out)
                    saved_cfg = json.loads(Path(out, "config.json").read_text())["quantization_config"]
                    saved = load_file(str(Path(out, "model.safetensors")))
                    again = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
                    with torch.no_grad():
                        same_logits = torch.equal(again(input_ids=_input_ids()).logits, logits)
                entry["round_trip"] = {
                    "config_equal": saved_cfg == qcfg,
                    "keys_equal": set(saved) == set(stored_file),
                    "tensors_equal": all(k in saved and saved[k].dtype == v.dtype and torch.equal(saved[k], v)
                                         for k, v in stored_file.items()),
                    "reload_logits_equal": same_logits,
                }
            report[f"{case}/{dtype}"] = entry
    (root / "ours_report.json").write_text(json.dumps(report, indent=1))


# ---------------------------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("sdnq_transformers")
    _run("reference", root)
    _run("ours", root)
    return json.loads((root / "ours_report.json").read_text())


@needs_reference
@pytest.mark.parametrize("dtype", LOAD_DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_load_matches_reference(report, case, dtype):
    r = report[f"{case}/{dtype}"]
    assert report["registered"]
    assert not r["sdnq_imported"] and r["is_sdnq_quantizer"], r["quantizer"]
    assert r["loading_info"] == {}, r["loading_info"]
    assert r["layers"] == r["quantized_in_file"] and len(r["layers"]) == 14
    assert r["stored_diff"] == [], r["stored_diff"][:5]
    assert r["dense_diff"] == [], r["dense_diff"][:5]
    if r["dequantize_fp32"] is not False:
        assert r["companion_dtypes"] == ["torch.float32"]
    tol = 1e-5 if dtype == "float32" else 2e-2
    assert r["logits_max_abs_diff"] <= tol * max(1.0, r["logits_scale"]), r
    assert r["lm_head_tied"] and r["lm_head_class"] == "Linear"


@needs_reference
def test_save_pretrained_round_trip(report):
    rt = report[f"{ROUND_TRIP_CASE}/float32"]["round_trip"]
    assert rt == {"config_equal": True, "keys_equal": True, "tensors_equal": True, "reload_logits_equal": True}


def test_config_keeps_fields():
    from transformers.quantizers.auto import AutoQuantizationConfig

    from diffusers_sdnq.integrations.transformers import SDNQTransformersConfig, register

    register()
    raw = {"quant_method": "sdnq", "weights_dtype": "uint4", "group_size": 0, "is_integer": True,
           "modules_to_not_convert": ["lm_head"], "some_future_field": {"a": 1}}
    with pytest.warns(UserWarning, match="some_future_field"):
        config = AutoQuantizationConfig.from_dict(dict(raw))
    assert isinstance(config, SDNQTransformersConfig)
    assert config.to_dict() == raw and config.weights_dtype == "uint4"
    assert config.use_svd is False  # absent field: read as the default
    old = SDNQTransformersConfig.from_dict({"quant_method": "sdnq", "weights_dtype": "int8"})
    assert old.dequantize_fp32 is False and "dequantize_fp32" not in old.to_dict()  # 0.1.0-0.1.5 default
    assert not hasattr(config, "dequantize")
    with pytest.raises(Exception, match="weights_dtype"):
        SDNQTransformersConfig(weights_dtype="int99")


def test_registration_is_pinned():
    from transformers.quantizers import auto

    from diffusers_sdnq.integrations.transformers import (
        SDNQHfQuantizer,
        SDNQTransformersConfig,
        is_registered,
        register,
    )

    register()
    register()
    assert is_registered()
    for method in ("sdnq", "sdnq_training"):  # what the GPL package does on import
        auto.AUTO_QUANTIZER_MAPPING[method] = object
        auto.AUTO_QUANTIZATION_CONFIG_MAPPING[method] = object
    assert auto.AUTO_QUANTIZER_MAPPING["sdnq_training"] is SDNQHfQuantizer
    assert auto.AUTO_QUANTIZATION_CONFIG_MAPPING["sdnq"] is SDNQTransformersConfig
    auto.AUTO_QUANTIZER_MAPPING["_sdnq_test_other"] = object  # other keys are untouched
    assert auto.AUTO_QUANTIZER_MAPPING.pop("_sdnq_test_other") is object


if __name__ == "__main__":
    {"reference": reference_side, "ours": ours_side}[sys.argv[1]](Path(sys.argv[2]))
